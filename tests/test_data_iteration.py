"""An importance pass starts the caller's data exactly once: no second DataLoader start (worker processes,
a draw from the global generator that changes shuffles and dropout masks), no item lost or repeated from a
stream, with the progress bar on or off."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import mas_local as ml
from tests.models import MLP


class CountingIterable:
    """Batches from a list; counts how often iteration starts and how many batches were handed out."""

    def __init__(self, batches):
        self.batches, self.starts, self.drawn = batches, 0, 0

    def __iter__(self):
        self.starts += 1
        for b in self.batches:
            self.drawn += 1
            yield b


class CountingLoader(DataLoader):
    starts = 0

    def __iter__(self):
        CountingLoader.starts += 1
        return super().__iter__()


class Stream(IterableDataset):
    """A stream that can be read once: a second start would yield nothing (items lost)."""

    def __init__(self, batches):
        self.batches, self.used = batches, False

    def __iter__(self):
        if self.used:
            return iter(())
        self.used = True
        return iter(self.batches)


def _batches(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 13, generator=g) for _ in range(n)]


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("mode,estimator", [("global", "sample"), ("local", "hebbian")])
def test_plain_iterable_starts_once(progress, mode, estimator):
    data = CountingIterable(_batches())
    ml.compute_importance(MLP(), data, mode, estimator, progress=progress)
    assert data.starts == 1 and data.drawn == 3


@pytest.mark.parametrize("progress", [False, True])
def test_dataloader_with_workers_starts_once_and_leaves_the_generator_as_one_loop_would(progress):
    ds = TensorDataset(torch.randn(12, 13, generator=torch.Generator().manual_seed(1)))
    loader = CountingLoader(
        ds, batch_size=4, shuffle=True, num_workers=2, collate_fn=lambda b: torch.stack([x for (x,) in b])
    )
    CountingLoader.starts = 0
    model = MLP()
    torch.manual_seed(5)
    ml.compute_importance(model, loader, "global", "sample", progress=progress)
    after_pass = torch.get_rng_state()
    assert CountingLoader.starts == 1
    torch.manual_seed(5)
    for _ in loader:  # the caller's own loop: one start, one draw
        pass
    assert torch.equal(after_pass, torch.get_rng_state())


def test_stream_is_read_once_and_whole():
    batches = _batches(4)
    torch.manual_seed(0)
    model = MLP()
    got = ml.compute_importance(model, Stream(batches), "global", "sample", progress=True)
    torch.manual_seed(0)
    want = ml.compute_importance(MLP(), batches, "global", "sample", progress=False)
    for k in want:
        torch.testing.assert_close(got[k], want[k])


def test_max_batches_draws_no_further():
    data = CountingIterable(_batches(5))
    ml.compute_importance(MLP(), data, "global", "sample", progress=False, max_batches=2)
    assert data.starts == 1 and data.drawn == 2  # a stream loses nothing past the limit
