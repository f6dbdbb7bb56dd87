"""convert / revert: identical outputs, gradients and checkpoints; include/exclude."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mas_local as ml
from tests.models import MLP, ResNetSmall


def _outputs_and_grads(model, x):
    model.zero_grad()
    y = model(x)
    y.pow(2).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("factory, shape", [(MLP, (6, 13)), (ResNetSmall, (3, 3, 5, 7))], ids=["mlp", "resnet"])
def test_round_trip_outputs_grads_and_state_dict(factory, shape):
    torch.manual_seed(0)
    plain = factory().train()
    x = torch.randn(*shape)
    converted = ml.convert(copy.deepcopy(plain))
    swapped = [m for m in converted.modules() if isinstance(m, (ml.MASLinear, ml.MASConv2d))]
    assert swapped and all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in swapped)
    y0, g0 = _outputs_and_grads(plain, x)
    y1, g1 = _outputs_and_grads(converted, x)
    assert torch.equal(y0, y1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert list(plain.state_dict()) == list(converted.state_dict())
    fresh_plain = factory()
    fresh_plain.load_state_dict(converted.state_dict(), strict=True)
    fresh_conv = ml.convert(factory())
    fresh_conv.load_state_dict(plain.state_dict(), strict=True)
    reverted = ml.revert(converted)
    assert not any(isinstance(m, (ml.MASLinear, ml.MASConv2d)) for m in reverted.modules())
    assert {type(m) for m in reverted.modules()} == {type(m) for m in plain.modules()}
    assert torch.equal(reverted(x), plain(x))


def test_include_exclude_by_name_type_and_predicate():
    model = MLP()
    ml.convert(model, include="fc*")
    assert isinstance(model.fc1, ml.MASLinear) and isinstance(model.fc2, ml.MASLinear)
    assert type(model.head) is nn.Linear
    ml.revert(model)
    ml.convert(model, exclude=["head", nn.LayerNorm])
    assert type(model.head) is nn.Linear and isinstance(model.fc1, ml.MASLinear)
    ml.revert(model)
    ml.convert(model, include=lambda name, m: m.out_features == 5)
    assert isinstance(model.head, ml.MASLinear) and type(model.fc1) is nn.Linear
    with pytest.raises(TypeError, match="include/exclude"):
        ml.convert(model, include=[3])
    with pytest.raises(TypeError):
        ml.convert("not a model")


def test_converted_layers_carry_no_state_outside_a_pass():
    model = ml.convert(MLP())
    ml.compute_importance(model, [torch.randn(3, 13)], progress=False)
    assert all(m._mas_tap is None for m in model.modules() if isinstance(m, ml.MASLinear))
    assert "_mas_tap" not in model.fc1.__dict__
