"""Local mode, streamed (``stream=True``, the default): each call is reduced as it returns and dropped.

Ω equals the pass that keeps every call (``stream=False``) and the brute-force oracle; the batches after a
signature's first keep no call of a plain stack (memory independent of depth); and a streamed batch that has to
take another path afterwards (the parameters read elsewhere, a module called more often than planned, a kept
call changed in place, new call layouts for the self-check) has its streamed calls taken back exactly."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mas_local as ml
import mas_local.importance.streaming as streaming
from mas_local.importance.capture import Capture
from tests import fuzz_oracles
from tests.closeness import assert_close_model_wide
from tests.models import ConvNet, Tied, TokenModel, tiny_llama

ESTIMATORS = ("hebbian", "sample")


def _omega(model, data, estimator, stream, **kw):
    return ml.compute_importance(model, data, "local", estimator, progress=False, stream=stream, **kw)


def _same(a, b, rtol=1e-12):
    assert a.keys() == b.keys()
    scale = max(v.abs().max().item() for v in b.values())
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}")


class Count:
    """How many calls each forward kept and how many the streamer reduced; how often a batch was taken back."""

    def __init__(self, monkeypatch):
        self.kept, self.streamed, self.undone = [], 0, 0
        record = Capture.__exit__

        def exit_(cap, *exc):
            if isinstance(cap.consume, streaming.Streamer):
                self.kept.append(len(cap.sites))
            return record(cap, *exc)

        monkeypatch.setattr(Capture, "__exit__", exit_)
        call = streaming.Streamer.__call__

        def call_(s, site):
            done = call(s, site)
            self.streamed += int(done)
            return done

        monkeypatch.setattr(streaming.Streamer, "__call__", call_)
        undo = streaming.undo

        def undo_(est, batch, n, streamer):
            self.undone += int(bool(streamer.streamed))
            return undo(est, batch, n, streamer)

        import mas_local.importance.pipeline as pipeline

        monkeypatch.setattr(pipeline, "undo", undo_)


class Stack(nn.Module):
    def __init__(self, depth, d=8):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))

    def forward(self, x):
        for lin, norm in zip(self.layers, self.norms):
            x = x + torch.tanh(norm(lin(x)))
        return x


def _seq(n_batches=4, b=3, t=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, t, d, generator=g, dtype=torch.float64) for _ in range(n_batches)]


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("depth", [3, 12])
def test_a_stack_keeps_no_call_after_the_first_batch(monkeypatch, estimator, depth):
    torch.manual_seed(0)
    model = Stack(depth).double()
    data = _seq()
    count = Count(monkeypatch)
    got = _omega(model, data, estimator, True)
    assert count.kept == [0, 0, 0, 0]  # every batch streamed: the first is planned by a forward of its own
    assert count.streamed == 4 * 2 * depth and count.undone == 0
    _same(got, _omega(model, data, estimator, False))
    case = SimpleNamespace(
        singles=[[x[k : k + 1] for k in range(x.shape[0])] for x in data], judge={}, judge_modules=lambda m: {}
    )
    assert_close_model_wide(got, fuzz_oracles.ORACLES["local", estimator](case, model))


def _tokens(n_batches=4, b=4, t=6, vocab=11, seed=1, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        if pad:
            mask[1, t - 2 :] = 0
            mask[3, 2:] = 0
        out.append({"idx": ids, "attention_mask": mask})
    return out


class Wrapped(nn.Module):
    """A keyword-batch wrapper: model(idx=..., attention_mask=...)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, attention_mask=None):
        return self.inner(idx)


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("make", [Tied, TokenModel], ids=["tied-and-called-twice", "padding-idx"])
def test_shared_parameters_stay_kept_and_padding_counts_as_without_streaming(monkeypatch, estimator, make):
    torch.manual_seed(0)
    model = Wrapped(make()).double()
    data = _tokens(vocab=11)
    count = Count(monkeypatch)
    got = _omega(model, data, estimator, True)
    # Tied under `sample`: every parameter is read at two calls (the tied pair, the layer called twice)
    assert (count.streamed > 0) != (make is Tied and estimator == "sample")
    _same(got, _omega(model, data, estimator, False))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_convolutions_and_a_llama_stream_to_the_same_omega(estimator):
    torch.manual_seed(0)
    conv = ConvNet().double()
    g = torch.Generator().manual_seed(2)
    images = [torch.randn(3, 3, 12, 12, generator=g, dtype=torch.float64) for _ in range(3)]
    _same(_omega(conv, images, estimator, True), _omega(conv, images, estimator, False))
    llama = tiny_llama().double()
    ids = [torch.randint(0, 97, (2, 7), generator=g) for _ in range(3)]
    masks = [torch.ones(2, 7, dtype=torch.long) for _ in range(3)]
    masks[1][0, 5:] = 0
    batches = [{"input_ids": i, "attention_mask": m} for i, m in zip(ids, masks)]
    _same(_omega(llama, batches, estimator, True), _omega(llama, batches, estimator, False), rtol=1e-10)


class Branchy(nn.Module):
    """Reads ``lin.weight`` outside ``lin`` only on some batches (``on``, set by the data before each batch: a
    branch that is the same for every sample of a batch, so the self-check holds)."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.out = nn.Linear(d, 3)
        self.on = False

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        if self.on:
            h = h + 0.5 * F.linear(h, self.lin.weight)
        return self.out(h)


class Looping(nn.Module):
    """Calls ``block`` once, or twice on some batches (``on``)."""

    def __init__(self, d=8):
        super().__init__()
        self.block = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
        self.out = nn.Linear(d, 3)
        self.on = False

    def forward(self, x):
        h = torch.tanh(self.block(x))
        if self.on:
            h = torch.tanh(self.block(h))
        return self.out(h)


class LateInPlace(nn.Module):
    """``a``'s output is changed in place after the call on some batches (``on``); ``twice``: ``a`` is called
    twice (a kept call under ``sample``) and its second output is the one changed."""

    def __init__(self, d=8, twice=False):
        super().__init__()
        self.a, self.b, self.twice = nn.Linear(d, d), nn.Linear(d, 3), twice
        self.on = False

    def forward(self, x):
        h = self.a(x)
        if self.twice:
            h = self.a(torch.tanh(h))
        if self.on:
            h.mul_(2.0)
        return self.b(torch.tanh(h))


class Switching:
    """The batches, each with the model's ``on`` flag set before it is handed out (list-like: iterable again)."""

    def __init__(self, model, *on):
        self.model, self.on, self.data = model, on, _seq(len(on), seed=4)

    def __len__(self):
        return len(self.data)

    def __iter__(self):
        for x, flag in zip(self.data, self.on):
            self.model.on = flag
            yield x


CHANGING = {
    # model, estimator: whether a streamed batch must be taken back
    ("branch", "hebbian"): (Branchy, True),  # lin.weight read outside lin: planned again
    ("branch", "sample"): (Branchy, True),
    ("loop", "hebbian"): (Looping, True),  # the LayerNorm (a sample statistic) called twice
    ("loop", "sample"): (Looping, True),
    # a streamed call changed in place later: already reduced with the values it had, nothing to take back
    ("inplace", "hebbian"): (LateInPlace, False),
    ("inplace", "sample"): (LateInPlace, False),
    # a kept call (a read twice under `sample`) changed in place: the batch runs again with copies
    ("inplace-kept", "sample"): (lambda: LateInPlace(twice=True), True),
}


@pytest.mark.parametrize("case", sorted(CHANGING), ids=lambda c: "-".join(c))
def test_a_streamed_batch_that_takes_another_path_is_taken_back(monkeypatch, case):
    make, undone = CHANGING[case]
    estimator = case[1]
    torch.manual_seed(0)
    model = make().double()
    data = Switching(model, False, False, True, False, True)  # batches 3 and 5 differ from the planning batch
    count = Count(monkeypatch)
    got = _omega(model, data, estimator, True)
    assert (count.undone >= 1) == undone
    assert count.streamed > 0
    _same(got, _omega(model, data, estimator, False))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("verify", ["off", "every"])
def test_every_batch_streams_whatever_the_self_check(monkeypatch, estimator, verify):
    torch.manual_seed(0)
    model = Stack(4).double()
    data = _seq()
    count = Count(monkeypatch)
    got = _omega(model, data, estimator, True, verify=verify)
    assert count.kept == [0, 0, 0, 0]
    _same(got, _omega(model, data, estimator, False, verify=verify))


def test_stream_setting_is_validated():
    with pytest.raises(TypeError, match="stream"):
        _omega(Stack(2).double(), _seq(), "hebbian", "yes")
