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
from tests import fuzz_oracles, oracles
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
    # Tied under `sample`: every parameter is read at two calls (the tied pair, the layer called twice). The
    # first batch streams the layer's first call on the guessed plan (each module called once); its second
    # call takes that back, and nothing streams after
    if make is Tied and estimator == "sample":
        assert count.streamed == count.undone == 1
    else:
        assert count.streamed > 0 and count.undone == 0
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


# The first batch of a signature streams on a guessed plan (each parameter computed by the modules that register
# it, each module called once) while the usage probe rides along (planning.RidingProbe): no forward of its own.


class ParentReads(nn.Module):
    """``proj.weight`` is also read by the parent: its plan computes it at the parent (the generic rule)."""

    def __init__(self, d=8):
        super().__init__()
        self.proj, self.out = nn.Linear(d, d), nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x) + 0.3 * F.linear(x, self.proj.weight)))


class WeightNormed(nn.Module):
    """A parametrized weight: its parameters are registered in the parametrization, read inside ``lin``."""

    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.utils.parametrizations.weight_norm(nn.Linear(d, d))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


class Gained(nn.Module):
    """``gain`` is read in a forward hook of the module that registers it (the generic rule re-runs the module
    with its hooks, and must not mistake the riding probe's pre-hook for the user's)."""

    def __init__(self, d=8):
        super().__init__()
        self.lin, self.out = nn.Linear(d, d), nn.Linear(d, 3)
        self.lin.gain = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.lin.register_forward_hook(lambda m, a, y: y * m.gain)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x)))


GUESSES = {  # model: whether the guessed plan holds (else the first batch's streamed calls are taken back)
    "stack": (lambda: Stack(3), True),
    "forward-hook": (Gained, True),
    "parent-reads": (ParentReads, False),
    "weight-norm": (WeightNormed, False),
    "called-twice": (Looping, None),  # holds under hebbian unless a sample-statistic module is called twice
}


def _forwards(model):
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name", sorted(GUESSES))
def test_the_first_batch_streams_on_a_guess_the_probe_confirms(monkeypatch, name, estimator):
    make, holds = GUESSES[name]
    torch.manual_seed(0)
    model = make().double()
    if name == "called-twice":
        model.on, holds = True, False  # the LayerNorm, a sample statistic, is called twice
    data = _seq(seed=2)
    hooks = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    calls, handle = _forwards(model)
    count = Count(monkeypatch)
    got = _omega(model, data, estimator, True, verify="off")
    handle.remove()
    # one forward per batch when the guess holds; else the first batch's is taken back and run on the plan seen
    assert len(calls) == len(data) + (0 if holds else 2)
    assert count.undone == (0 if holds else 1)
    assert hooks == [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in model.modules()]
    _same(got, _omega(model, data, estimator, False, verify="off"))
    if estimator == "sample" and name in ("stack", "forward-hook", "called-twice"):
        # and the brute-force loop (where the oracle judges each parameter at the module registering it)
        assert_close_model_wide(got, oracles.local(model, data, "sample"))
    # checked as it streams (verify="every"): the same Ω, and the first batch still needs no forward of its own
    _same(_omega(model, data, estimator, True, verify="every"), got, rtol=1e-10)


class Raises(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, 3)
        self.norm = nn.BatchNorm1d(d)

    def forward(self, x):
        h = self.norm(self.a(x))
        if x.shape[0] == 5:
            raise ValueError("a batch of 5 is not supported by this model")
        return self.b(h)


def test_a_model_that_raises_on_the_first_batch_surfaces_its_error_and_is_left_as_it_was():
    torch.manual_seed(0)
    model = Raises().double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch of 5"):
        _omega(model, [x], "hebbian", True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    assert x.shape == (5, 8)
    good = [torch.randn(4, 8, dtype=torch.float64) for _ in range(2)]
    _same(_omega(model, good, "hebbian", True), _omega(model, good, "hebbian", False))


class SeqFirstHooked(nn.Module):
    """A sequence-first ``nn.MultiheadAttention`` (the capture tracks its layout with a pre-hook of its own) with
    a forward hook of the user's that reads a parameter of the module: the generic rule must re-run it with
    that hook."""

    def __init__(self, d=8):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)  # batch_first=False
        self.attn.gain = nn.Parameter(1 + 0.3 * torch.randn(d))
        self.attn.register_forward_hook(lambda m, a, y: (y[0] * m.gain, y[1]))
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        h = x.transpose(0, 1)  # [T, B, d]
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.out(torch.tanh(h.transpose(0, 1)))


@pytest.mark.parametrize("stream", [True, False])
def test_a_sequence_first_module_with_a_users_forward_hook_is_rerun_with_it(stream):
    torch.manual_seed(0)
    model = SeqFirstHooked().double()
    data = _seq(n_batches=2, seed=3)
    got = _omega(model, data, "sample", stream)
    # the oracle: samples cut along dim 1 of the attention's inputs; out_proj is read by the attention module
    judge = {"attn.out_proj.weight": model.attn, "attn.out_proj.bias": model.attn}

    def batch_dim(mod, t, b):
        return None if not torch.is_tensor(t) else 1 if mod is model.attn else 0

    assert_close_model_wide(got, oracles.local(model, data, "sample", judge=judge, batch_dim=batch_dim))
    assert got["attn.gain"].abs().sum() > 0
