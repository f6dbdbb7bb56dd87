"""Which rows belong to which sample, and the self-check (docs/math.md): the patterns that were once silently
wrong or crashed, each against the brute-force loops of tests/oracles.py (float64, rtol 1e-5, atol 1e-6 × max Ω).
The fuzzer (tests/test_fuzz.py) covers their combinations; these are the minimal cases, named."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mas_local as ml
from mas_local.importance import Rule, register_rule, unregister_rule
from tests import oracles
from tests.test_importance import assert_close

D = torch.float64


def _x(*shape, seed=0):
    return torch.randn(*shape, dtype=D, generator=torch.Generator().manual_seed(seed))


class Keyword(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(input=x)


class Mul(nn.Module):
    def forward(self, h, w):
        return h * w


class ParamArgument(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.mul = nn.Linear(4, 4), Mul()
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        return self.mul(torch.tanh(self.lin(x)), self.scale)


class Alias(nn.Module):
    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(4, 4)
        self.alias = self.sub.weight

    def forward(self, x):
        return self.sub(x) + 0.3 * torch.tanh(F.linear(x, self.alias))


class TransposeRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return torch.tanh(self.proj(x) + 0.2 * (x @ self.proj.weight.T))


class TimeMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        b, t, c = x.shape
        return self.lin(x.transpose(0, 1).reshape(t * b, c)).reshape(t, b, c).transpose(0, 1)


class Gathered(nn.Module):
    """Top-1 MoE on gathered token rows: expert 0 gets exactly B rows on the first batch."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    def forward(self, x):
        b, t, c = x.shape
        flat = x.reshape(b * t, c)
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = (choice == e).nonzero().squeeze(1)
            if idx.numel():
                out = out.index_add(0, idx, expert(flat[idx]) * self.router(flat[idx]).softmax(-1)[:, e : e + 1])
        return out.reshape(b, t, c)


class PositionArange(nn.Module):
    """nanoGPT's position embedding on torch.arange(T), shared by the batch."""

    def __init__(self):
        super().__init__()
        self.pos, self.out = nn.Embedding(8, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(x + self.pos(torch.arange(x.shape[1]))))


CASES = {
    "keyword-call": (Keyword, lambda: [_x(3, 4), _x(2, 4, seed=1)]),
    "parameter-as-argument": (ParamArgument, lambda: [_x(3, 4), _x(2, 4, seed=1)]),
    "alias-parent-and-child": (Alias, lambda: [_x(3, 4), _x(2, 4, seed=1)]),
    ".T-read": (TransposeRead, lambda: [_x(3, 4), _x(2, 4, seed=1)]),
    "time-major-flatten": (TimeMajor, lambda: [_x(3, 2, 4), _x(2, 3, 4, seed=1)]),
    "moe-gathered": (Gathered, lambda: [_x(3, 2, 4), _x(4, 2, 4, seed=1)]),
    "arange-position-B-equals-T-later": (PositionArange, lambda: [_x(2, 3, 4), _x(3, 3, 4, seed=1)]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_global_sample_is_exact(name):
    torch.manual_seed(0)
    model = CASES[name][0]().double().eval()
    data = CASES[name][1]()
    assert_close(ml.compute_importance(model, data, progress=False), oracles.global_sample(model, data))


@pytest.mark.parametrize("name", list(CASES))
def test_data_order_does_not_change_omega(name):
    """Plans hold per batch signature: the same batches in another order give the same Ω."""
    torch.manual_seed(0)
    model = CASES[name][0]().double().eval()
    data = CASES[name][1]()
    for mode in ("global", "local"):
        a = ml.compute_importance(model, data, mode=mode, progress=False)
        b = ml.compute_importance(model, data[::-1], mode=mode, progress=False)
        assert_close(a, {k: v.double() for k, v in b.items()})


def test_local_sample_of_gathered_experts_counts_each_token_once():
    torch.manual_seed(0)
    model = Gathered().double().eval()
    data = CASES["moe-gathered"][1]()
    got = ml.compute_importance(model, data, mode="local", estimator="sample", progress=False)
    # each expert (and the router, called again on gathered rows) judged by its own output on each sample's
    # rows: the module-local loop over the samples, each run alone
    singles = [x[k : k + 1] for x in data for k in range(x.shape[0])]
    assert_close(got, oracles.local(model, singles, "sample"))


class Doubling(Rule):
    """A deliberately wrong rule: every per-sample gradient twice over."""

    def per_sample_grads(self, acc, site, params, rows):
        x = site.x[rows].to(D)
        d = site.delta[rows].to(D)
        out = {}
        if "weight" in params:
            out["weight"] = 2 * torch.einsum("bo,bi->boi", d, x)
        if "bias" in params:
            out["bias"] = 2 * d
        return out


class Scaled(nn.Linear):
    pass


def test_the_self_check_refuses_a_wrong_rule_and_names_the_parameter():
    """A rule that counts rows twice fails the identity on the first batch, and again with each sample
    alone: the pass raises naming the parameter and its module, never returning a number."""
    register_rule(Scaled, Doubling())
    try:
        model = nn.Sequential(Scaled(4, 3)).double()
        data = [_x(4, 4)]
        with pytest.raises(ml.ImportanceError, match=r"self-check failed.*0\.weight.*at '0'.*estimator='batch'"):
            ml.compute_importance(model, data, progress=False)
        # the advice works: global batch needs no per-sample split
        got = ml.compute_importance(model, data, estimator="batch", progress=False)
        assert_close(got, oracles.global_batch_official(model, data))
        # and without the check the wrong rule's number comes back (what the check exists to stop)
        wrong = ml.compute_importance(model, data, progress=False, verify="off")
        assert not torch.allclose(wrong["0.weight"].double(), oracles.global_sample(model, data)["0.weight"])
    finally:
        unregister_rule(Scaled)


def test_verify_settings_are_validated():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="verify"):
        ml.compute_importance(model, [torch.randn(2, 3)], verify="sometimes", progress=False)
    for v in ("first", "every", "off", True, False):
        ml.compute_importance(model, [torch.randn(2, 3)], verify=v, progress=False)


def test_a_float_position_tensor_given_to_a_module_is_not_masked_as_rows():
    """BART: embed_positions(inputs_embeds[:, :, -1]) gets a float [B, T]: local mode must not treat its
    columns as rows of a mask."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(8, 4)

        def forward(self, like):
            return self.table(torch.arange(like.shape[1]))

    class Bartish(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.out = nn.Embedding(11, 4), Positions(), nn.Linear(4, 3)

        def forward(self, input_ids, attention_mask=None):
            h = self.tok(input_ids)
            return self.out(torch.tanh(h + self.pos(h[:, :, -1])))

    torch.manual_seed(0)
    model = Bartish().double().eval()
    ids = torch.randint(1, 11, (3, 4), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    padded = [{"input_ids": ids, "attention_mask": mask}]
    alone = [{"input_ids": ids[k : k + 1, : int(mask[k].sum())]} for k in range(3)]
    for estimator in ("sample", "hebbian"):
        got = ml.compute_importance(model, padded, mode="local", estimator=estimator, progress=False)
        want = ml.compute_importance(model, alone, mode="local", estimator=estimator, progress=False)
        assert_close(got, {k: v.double() for k, v in want.items()})
