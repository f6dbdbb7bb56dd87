"""Hugging Face ``Conv1D`` (GPT-2 family, weight ``[in, out]``): its rule against brute-force loops, and MASConv1D.

Models are float64 and Ω is accumulated in float32, so Ω is compared with rtol 1e-5 (and an
absolute floor of 1e-6 of the largest reference value). The weights are re-drawn with a large
scale so that no statistic is near zero.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.importance import registered_rules, rule_for
from mas_local.importance.rules.conv1d import Conv1DRule
from tests import oracles

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

BACKENDS = [b for b in ("torch", "ext") if b in ml.available_backends("cpu")]


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _stack(convert=False):
    model = _randomise(nn.Sequential(Conv1D(7, 5), nn.Tanh(), Conv1D(4, 7)).double())
    return ml.convert(model) if convert else model


def _batches(kind):
    g = torch.Generator().manual_seed(3)
    if kind == "sequence":  # [B, T, F]: per-sample products over 3 positions
        return [torch.randn(b, 3, 5, generator=g, dtype=torch.float64) for b in (4, 3)]
    return [torch.randn(b, 5, generator=g, dtype=torch.float64) for b in (5, 2)]  # [B, F]: rank-1 per sample


def _close(omega, ref):
    assert omega.keys() == ref.keys()
    for k in ref:
        assert ref[k].abs().max() > 1e-3, k  # never compare zeros
        assert omega[k].dtype in (torch.float32, torch.float64) and omega[k].shape == ref[k].shape
        torch.testing.assert_close(omega[k].double(), ref[k], rtol=1e-5, atol=1e-6 * ref[k].abs().max().item())


def _hebbian_formula(model, batches, kinds):
    """Ω_ij = (1/R) Σ_r |x_ri||y_rj| (weight [in, out]) and Ω_j = (1/R) Σ_r |y_rj|, by a loop over positions."""
    rows = {}
    handles = [
        m.register_forward_hook(lambda mod, a, y, name=name: rows.setdefault(name, []).append((a[0], y)))
        for name, m in model.named_modules()
        if isinstance(m, kinds)
    ]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    out = {}
    for name, calls in rows.items():
        w = b = 0
        count = 0
        for x, y in calls:
            x2, y2 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
            for r in range(x2.shape[0]):
                w = w + torch.outer(x2[r].abs(), y2[r].abs())
                b = b + y2[r].abs()
                count += 1
        prefix = f"{name}." if name else ""
        out[prefix + "weight"], out[prefix + "bias"] = w / count, b / count
    return out


# ------------------------------------------------------------------ the rule
def test_conv1d_rule_serves_conv1d_and_mas_conv1d():
    assert isinstance(rule_for(Conv1D(3, 2)), Conv1DRule)
    assert isinstance(rule_for(ml.convert(nn.Sequential(Conv1D(3, 2)))[0]), Conv1DRule)

    class Scaled(Conv1D):  # its own forward: the generic rule, as for any subclass that overrides forward
        def forward(self, x):
            return 2 * super().forward(x)

    assert not isinstance(rule_for(Scaled(3, 2)), Conv1DRule)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sequence", "flat"])
@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
def test_global_sample_and_batch_match_brute_force(converted, kind, backend):
    model, data = _stack(converted), _batches(kind)
    _close(ml.compute_importance(model, data, backend=backend, progress=False), oracles.global_sample(model, data))
    _close(
        ml.compute_importance(model, data, estimator="batch", backend=backend, progress=False),
        oracles.global_batch_official(model, data),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sequence", "flat"])
@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
def test_local_estimators_match_brute_force_and_formula(converted, kind, backend):
    model, data = _stack(converted), _batches(kind)
    for est in ("sample", "batch"):
        got = ml.compute_importance(model, data, mode="local", estimator=est, backend=backend, progress=False)
        _close(got, oracles.local(model, data, est))
    hebbian = ml.compute_importance(model, data, mode="local", backend=backend, progress=False)
    _close(hebbian, _hebbian_formula(model, data, Conv1D))
    if kind == "flat":  # one position per sample: hebbian equals local sample (docs/math.md)
        _close(hebbian, oracles.local(model, data, "sample"))


def test_per_sample_grads_are_the_transposed_linear_ones():
    """The default Σ|g_k| built on per_sample_grads agrees with the fused path (both used by the engine)."""
    model, data = _stack(), _batches("sequence")

    class Unfused(Conv1DRule):
        add_sample_abs = ml.Rule.add_sample_abs
        batch_grads = ml.Rule.batch_grads

    builtin = registered_rules()[Conv1D]
    ml.register_rule(Conv1D, Unfused())
    try:
        slow = ml.compute_importance(model, data, progress=False)
        slow_batch = ml.compute_importance(model, data, estimator="batch", mode="local", progress=False)
    finally:
        ml.register_rule(Conv1D, builtin)
    _close(slow, oracles.global_sample(model, data))
    _close(slow_batch, oracles.local(model, data, "batch"))


# ------------------------------------------------------------------ GPT-2
def _gpt2(converted=False):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=64, bos_token_id=None, eos_token_id=None
    )
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    return ml.convert(model) if converted else model


def _gpt2_tokens():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 97, (b, 6), generator=g) for b in (3, 2)]


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
def test_gpt2_conv1d_parameters_against_brute_force(converted):
    """Only the Conv1D parameters are trainable (the rest of GPT-2 is covered elsewhere)."""
    model, data = _gpt2(converted), _gpt2_tokens()
    _randomise(model, seed=4)
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv) == 8 and all(isinstance(rule_for(m), Conv1DRule) for m in conv)
    assert all(isinstance(m, ml.layers.MASConv1D) == converted for m in conv)
    for name, p in model.named_parameters():
        p.requires_grad_(".c_" in name)
    _close(ml.compute_importance(model, data, progress=False), oracles.global_sample(model, data))
    _close(ml.compute_importance(model, data, mode="local", progress=False), _hebbian_formula(model, data, Conv1D))


# ------------------------------------------------------------------ MASConv1D
def _outputs_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    y = out.logits if hasattr(out, "logits") else out
    y.pow(2).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("which", ["stack", "gpt2"])
def test_mas_conv1d_round_trip(which):
    plain = _stack() if which == "stack" else _gpt2()
    x = _batches("sequence")[0] if which == "stack" else _gpt2_tokens()[0]
    converted = ml.convert(copy.deepcopy(plain))
    swapped = [m for m in converted.modules() if isinstance(m, ml.layers.MASConv1D)]
    assert swapped and all(isinstance(m, Conv1D) for m in swapped)
    assert not any(type(m) is Conv1D for m in converted.modules())
    y0, g0 = _outputs_and_grads(plain, x)
    y1, g1 = _outputs_and_grads(converted, x)
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert list(plain.state_dict()) == list(converted.state_dict())
    fresh = _stack() if which == "stack" else _gpt2()
    fresh.load_state_dict(converted.state_dict(), strict=True)
    fresh_converted = ml.convert(_stack() if which == "stack" else _gpt2())
    fresh_converted.load_state_dict(plain.state_dict(), strict=True)
    for k, v in plain.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v) and torch.equal(fresh_converted.state_dict()[k], v)
    reverted = ml.revert(converted)
    assert {type(m) for m in reverted.modules()} == {type(m) for m in plain.modules()}
    assert torch.equal(_outputs_and_grads(reverted, x)[0], y0)


def test_mas_conv1d_include_exclude_pickle_and_repr():
    model = nn.Sequential(Conv1D(4, 3), nn.Linear(4, 2))
    ml.convert(model, exclude=Conv1D)
    assert type(model[0]) is Conv1D and isinstance(model[1], ml.MASLinear)
    ml.convert(model)
    assert type(model[0]) is ml.layers.MASConv1D and repr(model[0]) == "MASConv1D(nf=4, nx=3)"
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[0]) is ml.layers.MASConv1D
    assert torch.equal(loaded[0].weight, model[0].weight)


@pytest.mark.parametrize("order", ["mas_local_first", "transformers_first"])
def test_importing_mas_local_does_not_import_transformers(order):
    """transformers is optional: mas_local never imports it, and its Conv1D gets the rule in either import order."""
    first = "import mas_local" if order == "mas_local_first" else "import transformers.pytorch_utils"
    code = f"""
        import sys
        {first}
        import mas_local as ml
        if "{order}" == "mas_local_first":
            assert "transformers" not in sys.modules, "import mas_local imported transformers"
        from transformers.pytorch_utils import Conv1D
        from mas_local.importance import registered_rules, rule_for
        from mas_local.importance.rules.conv1d import Conv1DRule
        layer = Conv1D(3, 2)
        assert isinstance(rule_for(layer), Conv1DRule)
        assert isinstance(registered_rules()[ml.layers.MASConv1D], Conv1DRule)
        assert isinstance(rule_for(ml.convert(layer)), Conv1DRule)
        assert not any("mas_local" in type(f).__module__ for f in sys.meta_path if hasattr(type(f), "__module__"))
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
