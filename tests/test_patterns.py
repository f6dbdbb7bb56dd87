"""Module patterns of real models, every estimator, against the brute-force loops of tests/oracles.py.

Subclasses with their own forward, a weight-standardised conv, a parameter registered
twice, a weight used inside and outside its module, MultiheadAttention and LSTM and a
Transformer layer in either layout (with T == B, where shapes cannot tell), a
parametrization, and a user-registered rule. float64 models; Ω accumulates in
float32: rtol 1e-5, atol 1e-6 × max|Ω|.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.importance import rules
from tests import oracles, patterns
from tests.test_importance import assert_close


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tokens(*shape, seed, vocab=13):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _seq_first_dims(mod, t, b):
    """Batch dims of module inputs in the sequence-first patterns (written for these models only)."""
    if not torch.is_tensor(t) or t.dim() == 0:
        return None
    inside = isinstance(mod, (nn.MultiheadAttention, nn.LSTM)) and not mod.batch_first
    inside = inside or getattr(mod, "_in_seq_first_layer", False)
    if inside and t.dim() == 3:
        return 1
    return 0 if t.shape[0] == b else None


def _attention(batch_first):
    model = patterns.Attention(batch_first)
    judge = {"mha.out_proj.weight": model.mha, "mha.out_proj.bias": model.mha}
    return model, judge


def _encoder():
    model = patterns.SeqFirstEncoder()
    for m in model.layer.modules():
        if m is not model.layer:
            m._in_seq_first_layer = True
    return model, {
        "layer.self_attn.out_proj.weight": model.layer.self_attn,
        "layer.self_attn.out_proj.bias": model.layer.self_attn,
    }


# name -> (model and local-judge factory, data); T == B in the sequence patterns, L == B for the LSTM's h_n
PATTERNS = {
    "subclass-forward": (
        lambda: (patterns.SubclassModel(), {}),
        lambda: [_randn(4, 3, 5, 6, seed=1), _randn(3, 3, 5, 6, seed=2)],
    ),
    "alias": (
        lambda: (m := patterns.Aliased(), {"alias": m.sub})[0:2],
        lambda: [_randn(4, 6, seed=3), _randn(3, 6, seed=4)],
    ),
    "tied-outside": (
        lambda: (m := patterns.TiedOutside(), {"emb.weight": m})[0:2],
        lambda: [_tokens(4, 3, seed=5), _tokens(3, 3, seed=6)],
    ),
    "mha-batch-first": (lambda: _attention(True), lambda: [_randn(4, 5, 5, seed=7), _randn(3, 5, 5, seed=8)]),
    "mha-seq-first": (lambda: _attention(False), lambda: [_randn(4, 4, 5, seed=9), _randn(3, 3, 5, seed=10)]),
    "encoder-seq-first": (_encoder, lambda: [_randn(4, 4, 5, seed=11), _randn(3, 3, 5, seed=12)]),
    "lstm-seq-first": (
        lambda: (patterns.Recurrent(False), {}),
        lambda: [_randn(2, 2, 5, seed=13), _randn(3, 3, 5, seed=14)],
    ),
    "lstm-batch-first": (
        lambda: (patterns.Recurrent(True), {}),
        lambda: [_randn(2, 2, 5, seed=15), _randn(3, 4, 5, seed=16)],
    ),
    "weight-norm": (
        lambda: (
            m := patterns.WeightNormed(),
            {"lin.parametrizations.weight.original0": m.lin, "lin.parametrizations.weight.original1": m.lin},
        )[0:2],
        lambda: [_randn(4, 5, seed=17), _randn(3, 5, seed=18)],
    ),
}


def build(name, converted):
    torch.manual_seed(0)
    factory, data = PATTERNS[name]
    model, judge = factory()
    model = model.double().eval()
    if converted:
        ml.convert(model)
    return model, judge, data()


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_global_sample(name, converted):
    model, _, data = build(name, converted)
    got = ml.compute_importance(model, data, progress=False)
    assert_close(got, oracles.global_sample(model, data))


@pytest.mark.parametrize("name", list(PATTERNS))
def test_global_batch(name):
    model, _, data = build(name, converted=True)
    got = ml.compute_importance(model, data, estimator="batch", progress=False)
    assert_close(got, oracles.global_batch_official(model, data))


@pytest.mark.parametrize("estimator", ["sample", "batch"])
@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_local(name, converted, estimator):
    model, judge, data = build(name, converted)
    got = ml.compute_importance(model, data, mode="local", estimator=estimator, progress=False)
    want = oracles.local(model, data, estimator, judge=judge, batch_dim=_seq_first_dims)
    assert_close(got, want)


def test_local_hebbian_on_subclasses_is_local_sample():
    """Neither subclass runs the forward of its registered base, so neither gets a Hebbian rule."""
    model, _, data = build("subclass-forward", converted=False)
    got = ml.compute_importance(model, data, mode="local", progress=False)
    assert_close(got, oracles.local(model, data, "sample"))


def test_rule_dispatch_is_exact():
    class KeepsForward(nn.Linear):
        def extra_repr(self):
            return "same forward"

    class OwnConvForward(nn.Conv2d):
        def _conv_forward(self, x, w, b):
            return super()._conv_forward(x, 2 * w, b)

    assert isinstance(rules.rule_for(nn.Linear(2, 2)), rules.LinearRule)
    assert isinstance(rules.rule_for(ml.MASLinear(2, 2)), rules.LinearRule)
    assert isinstance(rules.rule_for(KeepsForward(2, 2)), rules.LinearRule)
    assert rules.rule_for(patterns.ScaledLinear(2, 2)) is rules.GENERIC
    assert rules.rule_for(patterns.StdConv2d(2, 2, 3)) is rules.GENERIC
    assert rules.rule_for(OwnConvForward(2, 2, 3)) is rules.GENERIC  # overrides a method the conv rule relies on
    assert rules.rule_for(nn.PReLU(3)) is rules.GENERIC


def test_alias_is_counted_once():
    model, _, data = build("alias", converted=False)
    got = ml.compute_importance(model, data, progress=False)
    assert set(got) == {name for name, _ in model.named_parameters()}  # one entry for the aliased weight
    assert_close(got, oracles.global_sample(model, data))


class AdapterRule(ml.Rule):
    """A user rule for patterns.LowRankAdapter: y = x Wᵀ + b + (x Aᵀ) Bᵀ (the example of docs/rules.md)."""

    param_names = ("weight", "bias", "lora_a", "lora_b")

    def __init__(self):
        self.calls = 0

    def per_sample_grads(self, acc, site, params, rows):
        self.calls += 1
        m = site.module
        x = site.batch_first(site.x, site.x_dim)[rows]
        d = site.batch_first(site.delta, site.out_dims[0])[rows]
        x = x.reshape(x.shape[0], -1, x.shape[-1]).float()  # [b, positions, in]
        d = d.reshape(d.shape[0], -1, d.shape[-1]).float()  # [b, positions, out]
        grads = {}
        if "weight" in params:
            grads["weight"] = torch.einsum("bto,bti->boi", d, x)
        if "bias" in params:
            grads["bias"] = d.sum(1)
        if "lora_b" in params:
            grads["lora_b"] = torch.einsum("bto,btr->bor", d, x @ m.lora_a.detach().float().t())
        if "lora_a" in params:
            grads["lora_a"] = torch.einsum("btr,bti->bri", d @ m.lora_b.detach().float(), x)
        return grads


@pytest.fixture
def adapter_rule():
    rule = AdapterRule()
    ml.register_rule(patterns.LowRankAdapter, rule)
    yield rule
    ml.unregister_rule(patterns.LowRankAdapter)


@pytest.mark.parametrize("mode,estimator", [("global", "sample"), ("local", "sample"), ("local", "batch")])
def test_user_registered_rule_is_used_and_exact(adapter_rule, mode, estimator):
    torch.manual_seed(0)
    model = patterns.AdapterModel().double().eval()
    data = [_randn(4, 3, 7, seed=19), _randn(3, 3, 7, seed=20)]
    assert rules.rule_for(model.adapter) is adapter_rule
    got = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
    assert adapter_rule.calls > 0
    want = oracles.global_sample(model, data) if mode == "global" else oracles.local(model, data, estimator)
    assert_close(got, want)


def test_register_rule_validates():
    class NoGrads(ml.Rule):
        pass

    with pytest.raises(TypeError, match="per_sample_grads"):
        ml.register_rule(patterns.LowRankAdapter, NoGrads())
    with pytest.raises(TypeError, match="nn.Module subclass"):
        ml.register_rule(int, AdapterRule())
    with pytest.raises(TypeError, match="instance of"):
        ml.register_rule(patterns.LowRankAdapter, AdapterRule)


def test_sequence_first_model_fed_sequence_first_data_is_refused():
    """A model that itself takes [T, B, ·] cannot be told from a batch-first one by its data: refuse clearly."""
    torch.manual_seed(0)
    model = nn.LSTM(5, 4).double()  # batch_first=False
    x = _randn(3, 3, 5, seed=21)  # [T=3, B=3, F]: T == B, shapes cannot tell
    for mode in ("global", "local"):
        with pytest.raises(ml.ImportanceError, match="sequence-first.*batches are batch-first"):
            ml.compute_importance(model, [x], mode=mode, progress=False)
    # inside a batch-first model, a sequence-first module fed a mismatching batch is refused too
    wrapper = nn.Sequential(nn.Linear(5, 5), model).double()
    with pytest.raises(ml.ImportanceError, match="sequence-first.*Data batches are batch-first"):
        ml.compute_importance(wrapper, [_randn(6, 3, 5, seed=21)], progress=False)


def test_three_d_attention_mask_is_refused_for_per_sample_estimators():
    torch.manual_seed(0)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x):
            mask = torch.zeros(x.shape[0] * 2, x.shape[1], x.shape[1], dtype=torch.bool)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]

    model = Masked().double()
    with pytest.raises(ml.ImportanceError, match="per-sample-and-head mask"):
        ml.compute_importance(model, [_randn(3, 5, 4, seed=22)], progress=False)
    got = ml.compute_importance(model, [_randn(3, 5, 4, seed=22)], estimator="batch", progress=False)
    assert all(torch.isfinite(v).all() for v in got.values())


def _hebbian_expected(model, judge, data):
    """Linear-rule layers: the Hebbian formula over all their calls' rows; every other parameter: local sample."""
    want = oracles.local(model, data, "sample", judge=judge, batch_dim=_seq_first_dims)
    names = {id(p): n for n, p in model.named_parameters()}
    linears = [m for m in model.modules() if isinstance(rules.rule_for(m), rules.LinearRule)]
    rows = {id(m): ([], []) for m in linears}

    def record(mod, args, y):
        rows[id(mod)][0].append(args[0])
        rows[id(mod)][1].append(y)

    hooks = [m.register_forward_hook(record) for m in linears]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in hooks:
        h.remove()
    for m in linears:
        xs, ys = rows[id(m)]
        if not xs:
            continue
        w, b = oracles.hebbian_linear(
            torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]), torch.cat([t.reshape(-1, t.shape[-1]) for t in ys])
        )
        for local_name, value in (("weight", w), ("bias", b)):
            p = m._parameters.get(local_name)
            if p is not None:
                want[names[id(p)]] = value
    return want


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_local_hebbian(name, converted):
    model, judge, data = build(name, converted)
    got = ml.compute_importance(model, data, mode="local", progress=False)
    assert_close(got, _hebbian_expected(model, judge, data))
