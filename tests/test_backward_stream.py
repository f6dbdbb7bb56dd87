"""Global ``sample`` streamed through the backward (mas_local/importance/backward_stream.py) and the row blocks of
tied parameters: the same Ω as the unstreamed pass and the per-sample loop, less memory, the user's state untouched.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_local as ml
import mas_local.importance.backward_stream as backward_stream
import mas_local.importance.pipeline as pipeline
from mas_local.experiments.cost import peak_extra_bytes


class TiedLM(nn.Module):
    """Embedding and head tied, a generic-rule module (``Scale``), and a branch that never reaches the output."""

    def __init__(self, vocab: int = 40, width: int = 12):
        super().__init__()
        self.emb = nn.Embedding(vocab, width, padding_idx=1)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.scale = Scale(width)
        self.unused = nn.Linear(width, 3)  # called, but its output is dropped
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + torch.tanh(self.mix(h))
        self.unused(h)
        return self.head(self.scale(self.norm(h)))


class Scale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gain = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, h):
        return h * self.gain


class TwoBranch(nn.Module):
    """Two inputs, two branches that meet only at the end: each branch's first output drives the backward."""

    def __init__(self):
        super().__init__()
        self.a1, self.a2 = nn.Linear(5, 7), nn.Linear(7, 6)
        self.b1, self.b2 = nn.Linear(4, 7), nn.Linear(7, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a2(torch.relu(self.a1(x))) * self.b2(torch.relu(self.b1(y)))


def _loop(model: nn.Module, batches: list, call) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in zip(names, params)}
    count = 0
    for batch in batches:
        n = batch[0].shape[0] if isinstance(batch, tuple) else batch.shape[0]
        for k in range(n):
            one = tuple(t[k : k + 1] for t in batch) if isinstance(batch, tuple) else batch[k : k + 1]
            grads = torch.autograd.grad(call(model, one).pow(2).sum(), params, allow_unused=True)
            for name, g in zip(names, grads):
                if g is not None:
                    total[name] += g.double().abs()
            count += 1
    return {n: t / count for n, t in total.items()}


def _spy(monkeypatch) -> list[tuple[int, int | None]]:
    seen: list[tuple[int, int | None]] = []
    real = backward_stream.stream_global

    def spy(est, out, sites, check=None):
        kept = real(est, out, sites, check)
        seen.append((len(sites), None if kept is None else len(kept)))
        return kept

    monkeypatch.setattr(pipeline, "stream_global", spy)
    return seen


@pytest.mark.parametrize("chunk_bytes", [256 << 20, 12 * 4 * 5, 12 * 4])  # whole rows, 5-row and 1-row blocks
def test_tied_lm_streamed_equals_unstreamed_and_the_loop(monkeypatch, chunk_bytes):
    torch.manual_seed(0)
    model = TiedLM()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 40, (5, 9), generator=gen) for _ in range(3)]
    data[1][0, 4:] = 1  # padding tokens: the embedding's padding row gets no gradient
    with torch.no_grad():
        model.emb.weight[1].normal_()
    seen = _spy(monkeypatch)
    streamed = ml.compute_importance(model, data, "global", "sample", progress=False, chunk_bytes=chunk_bytes)
    # every batch streams (the first checked as it streams), keeping the tied calls and the generic one
    assert [k for _, k in seen] == [3, 3, 3]
    assert all(n == 6 for n, _ in seen)
    plain = ml.compute_importance(
        model, data, "global", "sample", progress=False, chunk_bytes=chunk_bytes, stream=False
    )
    loop = _loop(model, data, lambda m, x: m(x))
    for name in loop:
        torch.testing.assert_close(streamed[name], plain[name], rtol=1e-6, atol=0, msg=name)
        torch.testing.assert_close(streamed[name].double(), loop[name], rtol=2e-5, atol=1e-9, msg=name)
    assert float(loop["unused.weight"].abs().max()) == 0.0 and float(streamed["unused.weight"].abs().max()) == 0.0


def test_two_branches_each_drive_the_backward(monkeypatch):
    torch.manual_seed(2)
    model = TwoBranch()
    data = [(torch.randn(4, 5), torch.randn(4, 4)) for _ in range(3)]
    seen = _spy(monkeypatch)
    call = lambda m, b: m(*b)  # noqa: E731
    omega = ml.compute_importance(model, data, "global", "sample", progress=False, forward_fn=call)
    assert seen and all(k == 0 for _, k in seen)  # every call reduced inside the backward
    drivers = []
    real = backward_stream._drivers
    monkeypatch.setattr(backward_stream, "_drivers", lambda sites: drivers.append(real(sites)) or drivers[-1])
    ml.compute_importance(model, data, "global", "sample", progress=False, forward_fn=call, verify="off")
    assert [len(d) for d in drivers] == [2, 2, 2]  # a1's and b1's outputs
    loop = _loop(model, data, call)
    for name in loop:
        torch.testing.assert_close(omega[name].double(), loop[name], rtol=2e-5, atol=1e-9, msg=name)


def test_user_grads_are_left_as_they_were():
    torch.manual_seed(3)
    model = TiedLM()
    data = [torch.randint(0, 40, (4, 6)) for _ in range(2)]
    model(data[0]).sum().backward()
    before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    assert before["unused.weight"] is None and before["mix.weight"] is not None
    ml.compute_importance(model, data, "global", "sample", progress=False, verify="off")
    for n, p in model.named_parameters():
        assert (p.grad is None) if before[n] is None else torch.equal(p.grad, before[n]), n


def test_streaming_holds_less_than_the_batch_of_deltas():
    """Eight wide layers: unstreamed, every layer's Δ is held until the backward ends; streamed, one at a time."""
    torch.manual_seed(4)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(8)]).eval()
    data = [torch.randn(64, 64, 256) for _ in range(2)]  # each layer's Δ is 4 MiB

    def peak(stream: bool) -> int:
        run = lambda: ml.compute_importance(  # noqa: E731
            model, data, "global", "sample", progress=False, verify="off", stream=stream
        )
        run()  # warm-up (plans, kernels)
        return peak_extra_bytes(run)[1]

    streamed, plain = peak(True), peak(False)
    assert streamed < plain - 6 * (4 << 20)  # at least six layers' Δ fewer held at once


class PositionsLM(nn.Module):
    """Token and position embeddings; the positions' call is shared by the batch, so the first batch is planned
    on one forward and run again with that call expanded."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(50, 256), nn.Embedding(64, 256)
        self.body = nn.Sequential(*[nn.Sequential(nn.Linear(256, 256), nn.Tanh()) for _ in range(6)])
        self.head = nn.Linear(256, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        shared = self.pos(torch.arange(ids.shape[1]).unsqueeze(0))
        return self.head(self.body(self.tok(ids) + shared))


def test_first_batch_does_not_hold_the_planning_forward_while_it_runs_again():
    torch.manual_seed(5)
    model = PositionsLM().eval()
    ids = torch.randint(0, 50, (32, 64))
    params = list(model.parameters())

    def training_step():
        torch.autograd.grad(model(ids).pow(2).sum(), params)

    def first_batch():  # a new pass each time: its only batch is a first batch
        ml.compute_importance(model, [ids], "global", "sample", progress=False, verify="off")

    training_step(), first_batch()  # warm-up
    step, ours = peak_extra_bytes(training_step)[1], peak_extra_bytes(first_batch)[1]
    # measured: 18 MiB for the step, 36 MiB for the pass; 64 MiB while the planning forward's graph was kept
    assert ours < 2.5 * step


class Folded(nn.Module):
    """No rule of its own (the generic rule), and, when ``fold`` is on, an input with the batch folded into its
    first axis ([2·B, 4]): re-run on one sample's slices it then fails, so the pass learns only after the
    backward, while reducing, that this batch must go one sample at a time."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.fold = True

    def forward(self, x, folded):
        y = x * self.w
        return y + folded.view(x.shape[0], 2, 4).sum(1) if self.fold else y + folded[: x.shape[0]].detach() * 0


class FoldedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.mid, self.b = nn.Linear(4, 4), Folded(), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(self.mid(h, torch.cat([h, h.flip(-1)])))


def _assert_loop(got: dict, model: nn.Module, data: list) -> None:
    want = _loop(model, data, lambda m, x: m(x))
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_a_batch_that_fails_after_part_of_it_was_reduced_is_taken_back(monkeypatch):
    """The last Linear is reduced during the backward, then the generic rule fails on Folded. The first batch of
    the pass is taken back (the statistics emptied) and computed sample by sample; a new signature later in an
    unchecked pass is reduced apart and added only once every rule ran. Exact in every case."""
    torch.manual_seed(0)
    model = FoldedNet().double()
    g = torch.Generator().manual_seed(1)
    x4, x3 = torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    seen = _spy(monkeypatch)
    for verify in ("first", "off"):
        seen.clear()
        got = ml.compute_importance(model, [x4, x4], "global", "sample", progress=False, verify=verify)
        _assert_loop(got, model, [x4, x4])
        assert seen and seen[0][1] is not None  # the first batch streamed (and was taken back)
        for stream in (True, False):
            kw = dict(progress=False, verify=verify, stream=stream)
            _assert_loop(ml.compute_importance(model, [x4, x3], "global", "sample", **kw), model, [x4, x3])


def test_a_failure_after_a_partial_reduction_that_cannot_be_undone_is_refused():
    """A signature whose batches went through every rule streams; if a later batch of it fails after part of it
    was added (here the model starts folding its input), the pass raises instead of counting it twice."""
    torch.manual_seed(0)
    model = FoldedNet().double()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 4, generator=g, dtype=torch.float64) for _ in range(3)]
    model.mid.fold = False

    def data():
        yield xs[0]
        yield xs[1]
        model.mid.fold = True  # the same parameters read by the same calls: the same plan
        yield xs[2]

    with pytest.raises(ml.ImportanceError, match="cannot be restored"):
        ml.compute_importance(model, data(), "global", "sample", progress=False)
