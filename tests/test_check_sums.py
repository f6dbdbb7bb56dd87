"""The self-check holds its sums in bounded memory: large parameters as random sketches (importance.check_sums).

A sketch must add up like the sum it stands for (whole or row block by row block, in any order), equal sums must
pass the check's tolerance, and a sum that differs where a misattributed row would put it must fail. End to end, a
deliberately wrong rule on a parameter large enough to be sketched is still caught, in both modes.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import mas_local as ml
from mas_local.importance import check_sums as cs
from mas_local.importance import register_rule, unregister_rule
from mas_local.importance.rules.embedding import EmbeddingRule
from tests import oracles
from tests.test_importance import assert_close


def _param(m: int, n: int) -> torch.Tensor:
    return torch.empty(m, n)


def _relerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / float(torch.maximum(a.abs().max(), b.abs().max()))


def test_small_parameters_are_held_whole_and_large_ones_as_a_sketch():
    gen = torch.Generator().manual_seed(0)
    sums = cs.CheckSums(cs.Sketcher(gen))
    small, large = _param(64, 1024), _param(300, 257)  # 65536 (whole) and 77100 elements (sketched)
    g_small, g_large = torch.randn(64, 1024), torch.randn(300, 257)
    sums.add(small, g_small)
    sums.add(large, g_large)
    assert torch.equal(sums.get(id(small)), g_small)
    assert sums.get(id(large)).numel() == cs.SKETCH_RANK * (300 + 257) < large.numel()
    long = torch.empty(100_000)  # a vector: its sketch would be 8x its size, so it is held whole
    g_long = torch.randn(100_000)
    sums.add(long, g_long)
    assert torch.equal(sums.get(id(long)), g_long)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sketch_adds_up_whole_by_blocks_and_in_any_order(dtype):
    """Linearity: Σ of sketches = sketch of Σ, blocks of rows included (what lets both sides add pieces)."""
    torch.manual_seed(0)
    p = _param(500, 200)
    pieces = [torch.randn(500, 200, dtype=dtype) for _ in range(3)]
    sk = cs.Sketcher(torch.Generator().manual_seed(1))
    whole, parts = cs.CheckSums(sk), cs.CheckSums(sk)
    whole.add(p, sum(pieces))
    for g in reversed(pieces):
        for lo in range(0, 500, 77):  # uneven blocks
            parts.add(p, g[lo : lo + 77], rows=slice(lo, min(500, lo + 77)))
    tol = 1e-12 if dtype == torch.float64 else 2e-6  # float32: the sum's order differs
    assert _relerr(whole.get(id(p)), parts.get(id(p))) < tol


def test_a_sketch_shows_a_row_given_to_the_wrong_sample_and_passes_rounding():
    """Sums over S of per-sample gradients: equal up to float32 rounding pass the float32 tolerance; one row
    moved in or out of S (a tenth of the largest row's size, far below a real row's) fails it."""
    torch.manual_seed(0)
    p = _param(4000, 64)
    samples = [torch.zeros(4000, 64) for _ in range(4)]
    for g in samples:  # sparse, as an embedding's: each sample touches 100 rows
        g[torch.randint(0, 4000, (100,))] = torch.randn(100, 64)
    sk = cs.Sketcher(torch.Generator().manual_seed(2))
    exact, engine, wrong = cs.CheckSums(sk), cs.CheckSums(sk), cs.CheckSums(sk)
    exact.add(p, samples[0] + samples[1])
    engine.add(p, (samples[1].double() + samples[0].double()).float())
    moved = samples[0] + samples[1]
    row = int(samples[2].abs().sum(1).argmax())
    moved[row] += 0.1 * samples[2][row]
    wrong.add(p, moved)
    tol = 2e-4  # verify.tolerance for float32
    assert _relerr(engine.get(id(p)), exact.get(id(p))) < tol
    assert _relerr(wrong.get(id(p)), exact.get(id(p))) > 10 * tol


class BigEmbedding(nn.Embedding):
    pass


class SampleZeroAsOne(EmbeddingRule):
    """A deliberately wrong rule: sample 0's token rows are attributed to sample 1."""

    @staticmethod
    def _flat(acc, site):
        tok, d, sample = EmbeddingRule._flat(acc, site)
        return tok, d, sample.clamp(min=1) if acc.batch_samples > 1 else sample


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = BigEmbedding(3000, 32)  # 96,000 elements: sketched by the check
        self.head = nn.Linear(32, 8)

    def forward(self, ids):  # positions mixed: a token's gradient differs between samples, in sign too
        e = self.emb(ids)
        return self.head(torch.tanh(e - 2 * e.mean(1, keepdim=True).flip(-1)))


@pytest.mark.parametrize("mode", ["global", "local"])
def test_a_wrong_rule_on_a_sketched_parameter_is_caught(mode, caplog, monkeypatch):
    assert BigEmbedding(3000, 32).weight.numel() > cs.EXACT_NUMEL
    register_rule(BigEmbedding, SampleZeroAsOne())
    pairs = []
    real_pair = cs.Sketcher.pair
    monkeypatch.setattr(cs.Sketcher, "pair", lambda self, p, dtype: pairs.append(p.shape) or real_pair(self, p, dtype))
    try:
        torch.manual_seed(0)
        model = Tokens().eval()
        g = torch.Generator().manual_seed(1)
        data = [torch.randint(0, 40, (4, 12), generator=g) for _ in range(2)]  # shared tokens: Ω differs
        singles = [x[k : k + 1] for x in data for k in range(x.shape[0])]
        want = oracles.global_sample(model, singles) if mode == "global" else oracles.local(model, singles, "sample")
        if mode == "global":  # (a module-local gradient of an embedding is its rows: merged, they keep |·|)
            wrong = ml.compute_importance(model, data, mode=mode, estimator="sample", progress=False, verify="off")
            assert _relerr(wrong["emb.weight"], want["emb.weight"]) > 0.05  # what the check must stop
        with caplog.at_level(logging.INFO, logger="mas_local"):
            got = ml.compute_importance(model, data, mode=mode, estimator="sample", progress=False)
        assert (3000, 32) in pairs  # the embedding was compared through its sketch
        assert "one sample at a time" in caplog.text and "emb.weight" in caplog.text
        assert_close(got, want)
    finally:
        unregister_rule(BigEmbedding)


@pytest.mark.parametrize("chunk_bytes", [12 * 4 * 7, 12 * 4])  # 7-row and 1-row blocks of the tied 40 x 12 weight
def test_the_engine_side_by_row_blocks_passes_the_check(chunk_bytes, caplog):
    """With a small scratch budget the engine's subset sums of the tied embedding and head come block of rows by
    block; they must still equal the independent side, or the check would send the batch sample by sample."""
    from tests.test_backward_stream import TiedLM

    torch.manual_seed(0)
    model = TiedLM().double()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 40, (6, 9), generator=gen) for _ in range(2)]
    calls = []
    real = cs.CheckSums.add
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(cs.CheckSums, "add", lambda self, p, g, rows=None: calls.append(rows) or real(self, p, g, rows))
    try:
        with caplog.at_level(logging.INFO, logger="mas_local"):
            for mode in ("global", "local"):
                ml.compute_importance(
                    model, data, mode=mode, estimator="sample", progress=False, chunk_bytes=chunk_bytes, verify="every"
                )
    finally:
        monkeypatch.undo()
    assert any(r is not None and r.stop - r.start < 40 for r in calls)  # the blocked path ran
    assert "one sample at a time" not in caplog.text


def test_a_finished_pass_hands_over_its_accumulators_as_omega():
    """compute_importance's Ω is made in the accumulators themselves (divided in place): no second Ω-sized copy
    at the end of a pass (docs/performance.md, "Real sizes")."""
    from mas_local.config import ImportanceConfig
    from mas_local.importance.estimator import Estimator

    torch.manual_seed(0)
    model = Tokens()
    data = [torch.randint(0, 40, (4, 12)) for _ in range(2)]
    est = Estimator(model, config=ImportanceConfig(mode="global", estimator="sample", progress=False))
    for b in data:
        est.update(b)
    kept = est.result()  # a copy: the estimator can go on
    storage = {name: t.data_ptr() for name, t in est.stats.sums.items()}
    omega = est.result(release=True)
    assert all(omega[name].data_ptr() == ptr for name, ptr in storage.items())
    for name in kept:
        torch.testing.assert_close(omega[name], kept[name], rtol=0, atol=0)
    assert not est.stats.sums
