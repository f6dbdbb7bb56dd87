"""Closed-form rules of the normalisation layers against the brute-force loops (tests/oracles.py).

float64 models; Ω in float32: rtol 1e-5, atol 1e-6 × max|Ω|.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.importance import rules
from tests import oracles
from tests.closeness import assert_close_model_wide as assert_close  # a conv bias before InstanceNorm: Ω = 0


class LlamaLikeRMSNorm(nn.Module):
    """Computes what transformers' LlamaRMSNorm computes (recognised by what it computes)."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.variance_epsilon = eps

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32 if dtype != torch.float64 else dtype)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class GemmaLikeRMSNorm(LlamaLikeRMSNorm):
    """Named like an RMSNorm but scales by (1 + w): the closed form must not be used for it."""

    def forward(self, h):
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (1.0 + self.weight) * h


class CenteredRMSNorm(LlamaLikeRMSNorm):
    """Named like an RMSNorm but subtracts the mean first: x̂ differs, so the closed form would be wrong."""

    def forward(self, h):
        h = h - h.mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class Tokens(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.norm = norm
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


class Images(nn.Module):
    def __init__(self, norm, one_d=False):
        super().__init__()
        self.one_d = one_d
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        if self.one_d:
            h = h.mean((2, 3))  # [B, C] for BatchNorm1d
            return self.out(torch.tanh(self.norm(h)))
        return self.out(torch.tanh(self.norm(h)).mean((2, 3)))


def _with_random_affine(norm):
    with torch.no_grad():
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0)
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    return norm


CASES = {
    "layernorm": (lambda: Tokens(nn.LayerNorm(6)), "tokens", rules.LayerNormRule),
    "layernorm-2d": (lambda: Tokens(nn.LayerNorm(6, bias=False)), "rows", rules.LayerNormRule),
    "rmsnorm": (lambda: Tokens(nn.RMSNorm(6, eps=1e-5)), "tokens", rules.RMSNormRule),
    "hf-rmsnorm": (lambda: Tokens(LlamaLikeRMSNorm(6)), "tokens", rules.RMSNormRule),
    "gemma-rmsnorm": (lambda: Tokens(GemmaLikeRMSNorm(6)), "tokens", rules.RMSNormRule),
    "centered-rmsnorm": (lambda: Tokens(CenteredRMSNorm(6)), "tokens", rules.RMSNormRule),
    "batchnorm2d": (lambda: Images(nn.BatchNorm2d(4)), "images", rules.BatchNormRule),
    "batchnorm1d": (lambda: Images(nn.BatchNorm1d(4), one_d=True), "images", rules.BatchNormRule),
    "groupnorm": (lambda: Images(nn.GroupNorm(2, 4)), "images", rules.GroupNormRule),
    "instancenorm": (lambda: Images(nn.InstanceNorm2d(4, affine=True)), "images", rules.InstanceNormRule),
    "instancenorm-tracked": (
        lambda: Images(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)),
        "images",
        rules.InstanceNormRule,
    ),
}


def _data(kind):
    g = torch.Generator().manual_seed(4)
    shape = {"tokens": (4, 3, 5), "rows": (4, 5), "images": (4, 3, 5, 6)}[kind]
    first = torch.randn(*shape, generator=g, dtype=torch.float64)
    second = torch.randn(3, *shape[1:], generator=g, dtype=torch.float64)
    return [first, second]


def build(name):
    torch.manual_seed(0)
    factory, kind, rule_type = CASES[name]
    model = factory()
    _with_random_affine(model.norm)
    return model.double().eval(), _data(kind), rule_type


@pytest.mark.parametrize("name", list(CASES))
def test_rule_is_chosen(name):
    model, _, rule_type = build(name)
    assert isinstance(rules.rule_for(model.norm), rule_type)


@pytest.mark.parametrize(
    "mode,estimator", [("global", "sample"), ("global", "batch"), ("local", "sample"), ("local", "batch")]
)
@pytest.mark.parametrize("name", list(CASES))
def test_closed_form_matches_loop(name, mode, estimator):
    model, data, _ = build(name)
    got = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
    if mode == "global":
        want = (
            oracles.global_sample(model, data) if estimator == "sample" else oracles.global_batch_official(model, data)
        )
    else:
        want = oracles.local(model, data, estimator)
    assert_close(got, want)


def test_closed_form_runs_without_the_generic_rule(monkeypatch):
    """The norm parameters never go through torch.func (the point of the closed form)."""
    calls = []
    real = rules.GenericRule.per_sample_grads
    monkeypatch.setattr(rules.GenericRule, "per_sample_grads", lambda self, *a: calls.append(1) or real(self, *a))
    for name in ("layernorm", "rmsnorm", "hf-rmsnorm", "batchnorm2d", "groupnorm", "instancenorm"):
        model, data, _ = build(name)
        ml.compute_importance(model, data, progress=False)
    assert calls == []
    model, data, _ = build("gemma-rmsnorm")  # recognised by name, but computes (1 + w) x̂: generic, still exact
    ml.compute_importance(model, data, progress=False)
    assert calls


def test_batchnorm_in_train_mode_is_refused_per_sample_and_batch_still_works():
    model, data, _ = build("batchnorm2d")
    model.train()
    with pytest.raises(ml.ImportanceError, match="mixes the samples"):
        ml.compute_importance(model, data, eval_mode=False, progress=False)
    got = ml.compute_importance(model, data, mode="local", estimator="batch", eval_mode=False, progress=False)
    assert all(torch.isfinite(v).all() for v in got.values())
