"""Hugging Face models as users have them: tiny configs (random init, nothing downloaded), dict batches
with right padding and an attention mask.

For each model: default global and local importance give every trainable parameter a finite Ω; global
`sample` equals the brute-force per-sample loop over the *unpadded* samples (padding changes nothing);
local `hebbian` and `sample` on the padded batch equal the same on the unpadded samples; convert/revert
round trip; two tasks of MAS training; `generate()` after `convert` for causal LMs. float64 models
(Mixtral's experts run their per-expert loop); Ω accumulates in float32: rtol 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import mas_local as ml
from tests import oracles, zoo
from tests.closeness import assert_close_model_wide as assert_close

pytest.importorskip("transformers")

LENGTHS = [5, 3, 4]  # right-padded to 5


def _importance(model, batches, **kw):
    return ml.compute_importance(model, batches, progress=False, **kw)


@pytest.mark.parametrize("name", zoo.MODELS)
def test_defaults_cover_every_parameter(name):
    model = zoo.build(name)
    batch, _ = zoo.lengths_batch(name, LENGTHS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for mode in ("global", "local"):
        imp = _importance(model, [batch], mode=mode)
        assert set(imp) == trainable
        assert all(torch.isfinite(v).all() and not v.requires_grad for v in imp.values())
        nonzero = sum(bool(v.abs().sum() > 0) for v in imp.values())
        assert nonzero >= 0.9 * len(imp), f"{mode}: only {nonzero}/{len(imp)} parameters have importance"


@pytest.mark.parametrize("name", zoo.MODELS)
def test_global_sample_equals_loop_over_unpadded_samples(name):
    model = zoo.build(name)
    batch, singles = zoo.lengths_batch(name, LENGTHS)
    got = _importance(model, [batch])
    assert_close(got, oracles.global_sample(model, singles))


@pytest.mark.parametrize("estimator", ["hebbian", "sample"])
@pytest.mark.parametrize("name", [m for m in zoo.MODELS if m != "vit"])
def test_local_is_padding_invariant(name, estimator):
    model = zoo.build(name)
    batch, singles = zoo.lengths_batch(name, LENGTHS)
    padded = _importance(model, [batch], mode="local", estimator=estimator)
    one_by_one = _importance(model, singles, mode="local", estimator=estimator)
    # T5's relative position bias is one output [T, T, heads] shared by the batch and laid out over the padded
    # grid: local MAS judges it over that grid (docs/math.md, "Masks"), so it is the one exception
    grid = [k for k in padded if "relative_attention_bias" in k]
    assert (name == "t5") == bool(grid)
    for k in grid:
        del padded[k], one_by_one[k]
    assert_close(padded, {k: v.double() for k, v in one_by_one.items()})


@pytest.mark.parametrize("name", zoo.MODELS)
def test_convert_revert_round_trip(name):
    model = zoo.build(name)
    batch, _ = zoo.lengths_batch(name, LENGTHS)
    plain_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = oracles._out(model, batch)
    ml.convert(model)
    assert any(isinstance(m, (ml.MASLinear, ml.MASConv2d, ml.MASConv1D)) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(oracles._out(model, batch), before)
    plain = zoo.build(name)
    plain.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(plain_state, strict=True)
    ml.revert(model)
    assert not any(isinstance(m, (ml.MASLinear, ml.MASConv2d, ml.MASConv1D)) for m in model.modules())


@pytest.mark.parametrize("name", ["gpt2", "llama", "t5", "bert"])
def test_two_tasks_of_mas_training(name):
    model = zoo.build(name).float().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mas = ml.MAS(model, lam=10.0, progress=False)
    for task in range(2):
        batch, _ = zoo.lengths_batch(name, LENGTHS, seed=10 + task)
        batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
        for _ in range(3):
            out = oracles._out(model, batch)
            loss = out.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            value = mas.add_penalty_grad_()
            assert torch.isfinite(value)
            opt.step()
        mas.consolidate([batch])
    assert mas.num_tasks == 2
    assert all(torch.isfinite(v).all() for v in mas.importance.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert mas.penalty() > 0


@pytest.mark.parametrize("name", sorted(zoo.CAUSAL))
def test_generate_after_convert(name):
    model = zoo.build(name)
    ids = torch.randint(1, zoo.VOCAB, (2, 4), generator=torch.Generator().manual_seed(3))
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    want = model.generate(ids, **kwargs)
    ml.convert(model)
    assert torch.equal(model.generate(ids, **kwargs), want)
