"""The self-check's subset S (``verify.choose_subset``) and what it must catch.

Summed over every sample, per-sample gradients are the batch's gradient whichever rows are taken for which
sample, so S is not the whole batch (except, in local mode, a pair whose sample 0 is padded: its padding must
be in S, and the layouts' real rows differ there); and sample 0's rows come first in every layout, so S is
never sample 0 alone. A token model that flattens its tokens time-major ([T·B, d], which its sizes cannot tell from
sample-major [B·T, d]) on padded pairs of samples is the case where either mistake let a wrong Ω through: the
check must send such batches to the sample-by-sample path, and Ω must equal the brute-force loop's.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.importance.verify import choose_subset
from tests import oracles
from tests.closeness import assert_close_model_wide


def _masks(n: int, t: int, g: torch.Generator):
    yield None
    yield torch.ones(n, t, dtype=torch.bool)
    for _ in range(6):
        lengths = torch.randint(1, t + 1, (n,), generator=g)
        yield torch.arange(t)[None, :] < lengths[:, None]
    only_first = torch.ones(n, t, dtype=torch.bool)
    only_first[0, t // 2 :] = False
    yield only_first


@pytest.mark.parametrize("alone", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_the_subset_is_never_the_whole_batch_nor_sample_0_alone(n, alone):
    g = torch.Generator().manual_seed(n)
    for mask in _masks(n, 4, g):
        for seed in range(5):
            s = choose_subset(n, mask, alone, torch.Generator().manual_seed(seed)).tolist()
            assert s == sorted(set(s)) and s and s != [0], (n, mask, s)
            # the whole batch only for a pair whose sample 0 is padded (its padding must be in S)
            pair_padded_0 = alone and n == 2 and mask is not None and not bool(mask[0].all())
            assert len(s) < n or pair_padded_0, (n, mask, s)
            if mask is not None and not bool(mask.all()) and n > 2:  # the most padded sample is in S
                lengths = mask.sum(1)
                assert any(int(lengths[k]) == int(lengths.min()) for k in s)


class TimeMajor(nn.Module):
    """Embeds tokens, flattens them time-major through a Linear, and un-flattens."""

    def __init__(self, vocab=11, d=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d, bias=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        b, t, d = h.shape
        h = torch.tanh(self.lin(h.transpose(0, 1).reshape(t * b, d))).reshape(t, b, d).transpose(0, 1)
        return self.head(h)


@pytest.mark.parametrize("estimator", ["sample", "hebbian"])
@pytest.mark.parametrize("padded", [[[1, 1], [1, 0]], [[1, 0], [1, 1]]], ids=["sample-1-padded", "sample-0-padded"])
def test_a_time_major_flatten_on_a_padded_pair_is_caught(padded, estimator):
    torch.manual_seed(0)
    model = TimeMajor().double()
    mask = torch.tensor(padded)
    ids = torch.randint(1, 11, (2, 2)) * mask
    batch = {"input_ids": ids, "attention_mask": mask}
    got = ml.compute_importance(model, [batch], "local", estimator, progress=False)
    # the same samples, each alone and cut to its real tokens
    singles = [{"input_ids": ids[k : k + 1, : int(mask[k].sum())]} for k in range(2)]
    if estimator == "sample":
        want = oracles.local(model, singles, "sample")
    else:
        want = ml.compute_importance(model, singles, "local", "hebbian", progress=False, verify="off")
    assert_close_model_wide(got, want)


class GatheredExperts(nn.Module):
    """Top-1 routing by the data: each token goes to the expert ``route`` names, on gathered rows ``flat[idx]``,
    and is put back with ``index_add_``. Expert 1 gets exactly B tokens here, from two samples."""

    def __init__(self, d=4):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.head = nn.Linear(d, 2)

    def forward(self, x, route):
        b, t, d = x.shape
        flat, rt = x.reshape(-1, d), route.reshape(-1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx = (rt == e).nonzero(as_tuple=True)[0]
            if idx.numel():
                out = out.index_add(0, idx, torch.tanh(expert(flat[idx])))
        return self.head(out.reshape(b, t, d))


@pytest.mark.parametrize("mode,estimator", [("global", "sample"), ("local", "sample"), ("local", "hebbian")])
def test_gathered_tokens_that_number_b_are_not_read_as_samples(mode, estimator):
    """Fuzz seed 30486: three tokens of samples 0 and 1 gathered for one expert in a batch of three looked like
    [B, d], one row per sample, and the self-check's subset {1, 2} could not tell. Rows picked by values of the
    data are followed as such (``plan.UsageProbe.regathered``), so the batch is computed one sample at a time."""
    torch.manual_seed(0)
    model = GatheredExperts().double()
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    route = torch.tensor([[0, 2, 1, 0], [2, 1, 2, 1], [0, 0, 2, 2]])  # expert 1: (0, 2), (1, 1), (1, 3)
    batch = {"x": x, "route": route}
    got = ml.compute_importance(model, [batch], mode, estimator, progress=False)
    singles = [{"x": x[k : k + 1], "route": route[k : k + 1]} for k in range(3)]
    if estimator == "hebbian":
        want = ml.compute_importance(model, singles, mode, estimator, progress=False, verify="off")
    elif mode == "global":
        want = oracles.global_sample(model, singles)
    else:
        want = oracles.local(model, singles, "sample")
    assert_close_model_wide(got, want)
