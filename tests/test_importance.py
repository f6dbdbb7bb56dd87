"""Every estimator against a brute-force per-sample autograd loop (tests/oracles.py).

Models run in float64; Ω is accumulated in float32, so the tolerance is
rtol 1e-5 with atol 1e-6 × max|Ω| per parameter.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

import mas_local as ml
from tests import oracles
from tests.models import MLP, ConvNet, ResNetSmall, Tied, TokenModel


def assert_close(got: dict, want: dict, rtol=1e-5):
    assert set(got) == set(want)
    for name in want:
        w = want[name].double()
        g = got[name].double()
        assert got[name].dtype in (torch.float32, torch.float64)  # float64 exactly for float64 parameters
        scale = max(w.abs().max().item(), 1e-12)
        torch.testing.assert_close(g, w, rtol=rtol, atol=1e-6 * scale, msg=lambda m, n=name: f"{n}: {m}")
        assert w.abs().sum() > 0 or name.endswith("unused"), f"oracle is all zeros for {name}"


def mlp_data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 13, generator=g, dtype=torch.float64), torch.randn(3, 13, generator=g, dtype=torch.float64)]


def token_data(seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 17, (4, 3), generator=g), torch.randint(0, 17, (3, 3), generator=g)]


def conv_data(seed=3, shape=(9, 7)):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(4, 3, *shape, generator=g, dtype=torch.float64),
        torch.randn(3, 3, *shape, generator=g, dtype=torch.float64),
    ]


def build(kind, converted):
    torch.manual_seed(0)
    model, data = {
        "mlp": (MLP, mlp_data),
        "tokens": (TokenModel, token_data),
        "conv": (ConvNet, conv_data),
        "resnet": (ResNetSmall, lambda: conv_data(shape=(5, 7))),
        "tied": (Tied, lambda: [torch.randint(0, 11, (4, 3)), torch.randint(0, 11, (3, 3))]),
    }[kind]
    model, data = model().double(), data()
    # BatchNorm with non-trivial running statistics (eval mode uses them)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    if converted:
        ml.convert(model)
    return model.eval(), data


KINDS = ["mlp", "tokens", "conv", "resnet", "tied"]


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("kind", KINDS)
def test_global_sample_matches_per_sample_loop(kind, converted):
    model, data = build(kind, converted)
    got = ml.compute_importance(model, data, mode="global", progress=False)
    assert_close(got, oracles.global_sample(model, data))


@pytest.mark.parametrize("method", ["batch-as-groups", "unfolded"])
@pytest.mark.parametrize("kind", ["conv", "resnet"])
def test_conv_per_sample_methods_match_loop(kind, method, monkeypatch):
    """Both per-sample methods of the conv rule, whichever the device picks (the CPU takes batch-as-groups)."""
    from mas_local.importance.rules import conv

    monkeypatch.setattr(conv, "_grouped_on", lambda device: method == "batch-as-groups")
    model, data = build(kind, converted=False)
    got = ml.compute_importance(model, data, mode="global", progress=False)
    assert_close(got, oracles.global_sample(model, data))
    got = ml.compute_importance(model, data, mode="local", estimator="sample", progress=False)
    assert_close(got, oracles.local(model, data, "sample"))


@pytest.mark.parametrize("method", ["batch-as-groups", "unfolded"])
def test_conv_per_sample_methods_on_channels_last(method, monkeypatch):
    """Channels-last weights and inputs (batch and channels do not merge into one view there)."""
    from mas_local.importance.rules import conv

    monkeypatch.setattr(conv, "_grouped_on", lambda device: method == "batch-as-groups")
    model, data = build("resnet", converted=False)
    model = model.to(memory_format=torch.channels_last)
    data = [x.contiguous(memory_format=torch.channels_last) for x in data]
    got = ml.compute_importance(model, data, mode="global", progress=False)
    assert_close(got, oracles.global_sample(model, data))
    got = ml.compute_importance(model, data, mode="local", estimator="sample", progress=False)
    assert_close(got, oracles.local(model, data, "sample"))
    plain, plain_data = build("resnet", converted=False)
    got = ml.compute_importance(model, data, mode="local", estimator="hebbian", progress=False)
    assert_close(got, ml.compute_importance(plain, plain_data, mode="local", estimator="hebbian", progress=False))


@pytest.mark.parametrize("kind", KINDS)
def test_global_batch_matches_official_update(kind):
    model, data = build(kind, converted=True)  # batches of 4 and 3: unequal sizes
    got = ml.compute_importance(model, data, mode="global", estimator="batch", progress=False)
    assert_close(got, oracles.global_batch_official(model, data))


def test_global_batch_matches_official_and_avalanche_on_a_dataloader_short_last_batch():
    model, _ = build("mlp", converted=False)
    g = torch.Generator().manual_seed(5)
    dataset = torch.utils.data.TensorDataset(torch.randn(11, 13, generator=g, dtype=torch.float64))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)  # batches of 4, 4 and 3
    data = [x for (x,) in loader]
    assert [len(x) for x in data] == [4, 4, 3]
    got = ml.compute_importance(model, loader, estimator="batch", progress=False)
    assert_close(got, oracles.global_batch_official(model, data))
    assert_close(got, oracles.global_batch_avalanche(model, data))
    # and it is not the sample-weighted mean 1/N Σ_B |g_B| that equal batches would give
    weighted = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x in data:
        grads = torch.autograd.grad(model(x).pow(2).sum(), list(model.parameters()))
        for (n, _), gr in zip(model.named_parameters(), grads):
            weighted[n] += gr.abs() / 11
    assert (got["fc1.weight"].double() - weighted["fc1.weight"]).abs().max() > 1e-3 * weighted["fc1.weight"].abs().max()


def test_global_batch_is_avalanche_times_channels_on_sequence_outputs():
    """Avalanche's norm(out, dim=1).pow(2).mean() on [B, T, C] also divides by C."""
    model, data = build("tokens", converted=False)  # output [B, T=3, C=5]
    got = ml.compute_importance(model, data, estimator="batch", progress=False)
    ava = oracles.global_batch_avalanche(model, data)
    assert_close(got, {n: 5 * v for n, v in ava.items()})


@pytest.mark.parametrize("estimator", ["sample", "batch"])
@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("kind", KINDS)
def test_local_sample_and_batch_match_loop(kind, converted, estimator):
    model, data = build(kind, converted)
    got = ml.compute_importance(model, data, mode="local", estimator=estimator, progress=False)
    assert_close(got, oracles.local(model, data, estimator))


def test_local_sample_equals_hebbian_with_one_position_per_sample():
    model, data = build("mlp", converted=True)
    hebb = ml.compute_importance(model, data, mode="local", progress=False)
    samp = ml.compute_importance(model, data, mode="local", estimator="sample", progress=False)
    for name in ("fc1.weight", "fc1.bias", "fc2.weight", "head.weight", "head.bias"):
        torch.testing.assert_close(hebb[name], samp[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
def test_hebbian_linear_on_tokens_matches_formula(converted):
    torch.manual_seed(0)
    lin = nn.Linear(13, 5).double()
    model = nn.Sequential(lin)
    if converted:
        ml.convert(model)
    g = torch.Generator().manual_seed(9)
    data = [
        torch.randn(7, 3, 13, generator=g, dtype=torch.float64),
        torch.randn(2, 3, 13, generator=g, dtype=torch.float64),
    ]
    got = ml.compute_importance(model, data, mode="local", progress=False)
    x = torch.cat([d.reshape(-1, 13) for d in data])
    with torch.no_grad():
        w, b = oracles.hebbian_linear(x, lin(x))
    torch.testing.assert_close(got["0.weight"].double(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["0.bias"].double(), b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=3, out_channels=4, kernel_size=3, padding=1),
        dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), groups=2),
        dict(in_channels=3, out_channels=2, kernel_size=2, dilation=2, padding=(1, 2), bias=False),
        dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, groups=3, padding=2, dilation=(1, 2)),
    ],
    ids=["pad", "grouped-strided", "dilated-nobias", "all"],
)
@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
def test_hebbian_conv2d_matches_receptive_field_formula(kwargs, converted):
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs).double()
    model = nn.Sequential(conv)
    if converted:
        ml.convert(model)
    x = torch.randn(3, kwargs["in_channels"], 5, 7, dtype=torch.float64)
    got = ml.compute_importance(model, [x[:2], x[2:]], mode="local", progress=False)
    with torch.no_grad():
        y = conv(x)
    want = oracles.hebbian_conv2d(x, y, conv)
    torch.testing.assert_close(got["0.weight"].double(), want, rtol=1e-5, atol=1e-7)
    if conv.bias is not None:
        events = y.shape[0] * y.shape[2] * y.shape[3]
        torch.testing.assert_close(got["0.bias"].double(), y.abs().sum((0, 2, 3)) / events, rtol=1e-5, atol=1e-7)
    # and the closed form of docs/math.md: conv2d_weight(|x|, W.shape, |y|, ...) / R
    closed = torch.nn.grad.conv2d_weight(
        x.abs(), conv.weight.shape, y.abs(), conv.stride, conv.padding, conv.dilation, conv.groups
    ) / (y.shape[0] * y.shape[2] * y.shape[3])
    torch.testing.assert_close(want, closed, rtol=1e-9, atol=1e-12)


def test_embedding_never_materialises_vocab_per_sample():
    """A 32k vocabulary: per-sample rows only; peak extra memory stays far below B×vocab×dim."""
    torch.manual_seed(0)
    emb = nn.Embedding(32000, 64)
    model = nn.Sequential(emb, nn.Linear(64, 3))
    idx = torch.randint(0, 32000, (16, 12))
    idx[:, :3] = idx[:, 3:6]  # repeated tokens within a sample
    got = ml.compute_importance(model, [idx], progress=False)
    want = oracles.global_sample(model, [idx])
    torch.testing.assert_close(got["0.weight"].double(), want["0.weight"], rtol=1e-5, atol=1e-9)
    touched = (got["0.weight"].abs().sum(1) > 0).sum().item()
    assert touched == idx.unique().numel()


def test_estimators_accept_dict_and_tuple_batches():
    model, data = build("mlp", converted=False)
    as_tuple = [(x, torch.zeros(len(x))) for x in data]
    a = ml.compute_importance(model, data, progress=False)
    b = ml.compute_importance(model, as_tuple, progress=False)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_inplace_activation_is_handled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    for mode, oracle in (("global", oracles.global_sample), ("local", None)):
        got = ml.compute_importance(model, [x], mode=mode, estimator="sample", progress=False)
        want = oracle(model, [x]) if oracle else oracles.local(model, [x], "sample")
        assert_close(got, want)


class _MutatesInput(nn.Module):
    """fc2's input (fc1's output) is changed in place after fc2 has run; ``twin`` does the same out of place."""

    def __init__(self, twin: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 3)
        self.twin = twin

    def forward(self, x):
        h = self.fc1(x)
        y = self.fc2(h)
        h = h * -2.0 if self.twin else h.mul_(-2.0)
        return self.fc3(y + h)


@pytest.mark.parametrize("estimator", ["sample", "batch", "hebbian"])
def test_input_changed_in_place_after_the_call(estimator):
    """Local mode: the call's input is captured as it was when the module ran, on every batch of the pass."""
    torch.manual_seed(0)
    model = _MutatesInput().double()
    twin = _MutatesInput(twin=True).double()
    twin.load_state_dict(model.state_dict())
    data = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    got = ml.compute_importance(model, data, mode="local", estimator=estimator, progress=False)
    if estimator == "hebbian":
        want = ml.compute_importance(twin, data, mode="local", estimator=estimator, progress=False)
        rows = [(x, twin.fc1(x), twin.fc2(twin.fc1(x))) for x in data]
        w_fc2, b_fc2 = oracles.hebbian_linear(torch.cat([h for _, h, _ in rows]), torch.cat([y for *_, y in rows]))
        torch.testing.assert_close(got["fc2.weight"], w_fc2, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got["fc2.bias"], b_fc2, rtol=1e-5, atol=1e-7)
    else:
        want = oracles.local(twin, data, estimator)
    assert_close(got, want)


class _ChangedAfter(nn.Module):
    """fc1's output is changed in place after fc1 ran, in one of several ways; ``twin`` does it out of place."""

    def __init__(self, how: str, twin: bool = False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3)
        self.how, self.twin = how, twin

    def forward(self, x):
        h = self.fc1(x)
        if self.twin:
            h = torch.cat([torch.relu(h[:, :2]), h[:, 2:]], 1) if self.how == "view" else torch.relu(h)
        elif self.how == "method":
            h.relu_()
        elif self.how == "functional":
            torch.nn.functional.relu(h, inplace=True)
        elif self.how == "view":
            h[:, :2].relu_()
        else:  # unseen by the first batch's probe: only the version counters show it
            with torch._C.DisableTorchFunction():
                h.relu_()
        return self.fc2(h)


@pytest.mark.parametrize(
    "how,stream,runs",
    [("method", False, 3), ("functional", False, 3), ("view", False, 3), ("unseen", False, 4)]
    + [(how, True, 3) for how in ("method", "functional", "view", "unseen")],
)
def test_output_changed_in_place_is_copied_without_a_rerun(how, stream, runs):
    """Local mode, every call kept: an in-place change the first batch sees is copied before it happens (one
    forward per batch); one it cannot see costs one re-run of the first batch. Streamed: each call is reduced
    before the change, whatever it is, and the first batch needs no forward of its own either: the usage probe
    rides along with it (``planning.RidingProbe``). Either way Ω is what the out-of-place twin gets."""
    torch.manual_seed(0)
    model, twin = _ChangedAfter(how).double(), _ChangedAfter(how, twin=True).double()
    twin.load_state_dict(model.state_dict())
    data = [torch.randn(6, 5, dtype=torch.float64) for _ in range(3)]
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    for estimator in ("hebbian", "sample"):
        calls.clear()
        # the engine's own forwards (the self-check runs samples of its own: off here)
        got = ml.compute_importance(
            model, data, mode="local", estimator=estimator, progress=False, verify="off", stream=stream
        )
        assert len(calls) == runs
        assert_close(got, ml.compute_importance(twin, data, mode="local", estimator=estimator, progress=False))
    assert_close(got, oracles.local(twin, data, "sample"))
    # in micro-batches the first piece plans the pass and copies before the write; the others copy from the start
    got = ml.compute_importance(model, data, mode="local", estimator="hebbian", micro_batch=4, progress=False)
    assert_close(got, ml.compute_importance(twin, data, mode="local", estimator="hebbian", progress=False))


def test_mode_restored_and_grads_untouched():
    model, data = build("conv", converted=False)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ml.compute_importance(model, data, progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_frozen_parameters_are_skipped():
    model, data = build("mlp", converted=False)
    model.fc1.weight.requires_grad_(False)
    got = ml.compute_importance(model, data, progress=False)
    assert "fc1.weight" not in got and "fc1.bias" in got
    assert_close(got, oracles.global_sample(model, data))


def test_chunking_gives_the_same_result():
    model, data = build("conv", converted=True)
    a = ml.compute_importance(model, data, progress=False)
    b = ml.compute_importance(model, data, progress=False, chunk_bytes=1)  # one sample per chunk
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-9)


class _SharedConv(nn.Module):
    """One convolution called on two inputs, and a tied embedding/head with a padding index."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, groups=1)
        self.out = nn.Linear(8, 5)

    def forward(self, x):
        a = torch.tanh(self.conv(x)).mean((2, 3))
        b = torch.tanh(self.conv(x.flip(-1) * 0.5)).mean((2, 3))
        return self.out(torch.cat([a, b], 1))


class _TiedPadded(nn.Module):
    def __init__(self, vocab=9, d=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["one-chunk", "one-sample-chunks"])
@pytest.mark.parametrize("method", ["batch-as-groups", "unfolded"])
def test_parameters_computed_at_several_calls(method, chunk_bytes, monkeypatch):
    """Per-sample gradients of a conv called twice and of a tied embedding/head (with padding tokens) are
    summed over the calls before |·|, also when the batch is cut into one-sample chunks."""
    from mas_local.importance.rules import conv

    monkeypatch.setattr(conv, "_grouped_on", lambda device: method == "batch-as-groups")
    kw = {} if chunk_bytes is None else {"chunk_bytes": chunk_bytes}
    torch.manual_seed(0)
    model = _SharedConv().double().eval()
    data = conv_data(shape=(6, 5))
    assert_close(ml.compute_importance(model, data, progress=False, **kw), oracles.global_sample(model, data))
    got = ml.compute_importance(model, data, mode="local", estimator="sample", progress=False, **kw)
    assert_close(got, oracles.local(model, data, "sample"))
    torch.manual_seed(1)
    model = _TiedPadded().double().eval()
    data = [torch.tensor([[3, 5, 0, 0], [1, 8, 8, 2], [0, 4, 6, 7]]), torch.tensor([[2, 2, 0, 1], [7, 0, 0, 0]])]
    assert_close(ml.compute_importance(model, data, progress=False, **kw), oracles.global_sample(model, data))


def test_local_activation_hebbian_matches_formula():
    """hebbian with a user activation pairs |act(y)| with |x| (layers not named keep y)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x = torch.randn(7, 3, 13, dtype=torch.float64)
    got = ml.compute_importance(model, [x], mode="local", activation={"0": torch.relu}, progress=False)
    with torch.no_grad():
        y0 = model[0](x)
        y2 = model[2](torch.relu(y0))
    w0, b0 = oracles.hebbian_linear(x, torch.relu(y0))
    w2, _ = oracles.hebbian_linear(torch.relu(y0), y2)
    torch.testing.assert_close(got["0.weight"].double(), w0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["0.bias"].double(), b0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["2.weight"].double(), w2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("estimator", ["sample", "batch"])
def test_local_activation_sample_matches_loop(estimator):
    """sample/batch with an activation: |∂(½‖act(y)‖²)/∂θ| per sample (batch), by brute force."""
    torch.manual_seed(0)
    model, data = build("conv", converted=True)
    got = ml.compute_importance(model, data, mode="local", estimator=estimator, activation=torch.tanh, progress=False)
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    want = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    total = 0
    for x in data:
        calls = oracles._record_calls(model, x)
        sample = estimator == "sample"
        groups = [slice(k, k + 1) for k in range(x.shape[0])] if sample else [slice(0, x.shape[0])]
        for sl in groups:
            for mod, args, _ in calls:
                y = mod(args[0][sl])
                a = torch.tanh(y) if isinstance(mod, layers) else y
                names = [n for n, p in model.named_parameters() if any(p is q for q in mod.parameters(False))]
                grads = torch.autograd.grad(0.5 * a.pow(2).sum(), list(mod.parameters(False)))
                for n, g in zip(names, grads):
                    want[n] += g.abs() if sample else g.abs() / x.shape[0]
        total += x.shape[0] if sample else 1
    assert_close(got, {n: v / total for n, v in want.items()})


def test_activation_errors():
    model = MLP()
    with pytest.raises(ValueError, match="local MAS only"):
        ml.compute_importance(model, [torch.randn(2, 13)], activation=torch.relu, progress=False)
    with pytest.raises(ValueError, match="matches no Linear/Conv layer"):
        ml.MAS(model, mode="local", activation={"nope*": torch.relu})
    with pytest.raises(ml.ImportanceError, match="output shape"):
        ml.compute_importance(model, [torch.randn(2, 13)], mode="local", activation=lambda y: y.sum(-1), progress=False)


class _DropsIntermediate(nn.Module):
    """An intermediate computed from the batch, dropped before the next layer runs."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 4), nn.Linear(4, 3)
        self.alive_at_fc2: list[bool] = []
        self.fc2.register_forward_pre_hook(lambda m, a: self.alive_at_fc2.append(self._tmp() is not None))

    def forward(self, x):
        tmp = self.fc1(x) * 2.0
        self._tmp = weakref.ref(tmp)
        h = torch.tanh(tmp)
        del tmp
        return self.fc2(h)


def test_first_batch_probe_keeps_no_intermediate_alive():
    """The usage probe follows tensors computed from the batch by weak reference: it holds none of them."""
    model = _DropsIntermediate().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    for stream in (False, True):  # the probe rides along with the capture / plans in a forward of its own
        model.alive_at_fc2.clear()
        ml.compute_importance(model, [x, x], mode="local", progress=False, stream=stream)
        assert model.alive_at_fc2 and not any(model.alive_at_fc2)


@pytest.mark.parametrize(
    "mode,estimator", [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample")]
)
def test_omega_dtype_follows_parameter_width(mode, estimator):
    """Ω is float64 for float64 parameters and float32 otherwise, in every estimator: a float64 model whose
    Ω is below float32's range (MobileViT's tiny global-batch Ω is ~1e-40) keeps it instead of rounding to 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-30)  # layer 2: |y₂|, |h| ~ 1e-30 (the biases), so Ω ~ 1e-60: zero in float32
    data = [torch.randn(b, 6, dtype=torch.float64) for b in (4, 3)]
    omega64 = ml.compute_importance(model, data, mode, estimator, progress=False)
    assert all(v.dtype == torch.float64 for v in omega64.values())
    assert all(v.abs().max() > 0 for v in omega64.values())
    assert omega64["2.weight"].abs().max() < 1e-45  # would be 0 in float32
    omega32 = ml.compute_importance(model.float(), [x.float() for x in data], mode, estimator, progress=False)
    assert all(v.dtype == torch.float32 for v in omega32.values())


class _ShortConv(nn.Module):
    """A strided Conv1d over one position of a transposed input: [B, 1, C] -> [B, C, 1] with strides (C, 1, C),
    whose 2-D view is contiguous with strides that also read as channels-last."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(5, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.transpose(1, 2))).flatten(1))


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_a_float64_conv1d_on_one_position_gets_its_per_sample_gradients(mode, batch):
    """torch's CPU slow_conv2d refused the per-sample weight gradient here ("grad_weight must be contiguous")."""
    torch.manual_seed(0)
    model = _ShortConv().double()
    data = [torch.randn(batch, 1, 5, dtype=torch.float64) for _ in range(2)]
    got = ml.compute_importance(model, data, mode, "sample", progress=False)
    want = oracles.global_sample(model, data) if mode == "global" else oracles.local(model, data, "sample")
    assert_close(got, want)
