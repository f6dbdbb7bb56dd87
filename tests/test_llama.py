"""A small Llama built from a transformers config (random weights, no download)."""

from __future__ import annotations

import copy

import pytest
import torch

import mas_local as ml
from tests import oracles
from tests.models import tiny_llama

pytest.importorskip("transformers")


def _batches(seed, n=2, b=3, t=5, vocab=97):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("converted", [False, True], ids=["plain", "converted"])
@pytest.mark.parametrize("mode", ["global", "local"])
def test_every_parameter_gets_importance(mode, converted):
    model = tiny_llama()
    if converted:
        ml.convert(model)
    imp = ml.compute_importance(model, _batches(0), mode=mode, progress=False)
    names = [n for n, _ in model.named_parameters()]
    assert list(imp) == names
    for n, omega in imp.items():
        assert omega.dtype == torch.float32 and torch.isfinite(omega).all()
        assert omega.sum() > 0, n


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_global_sample_matches_loop_on_llama(tie):
    model = tiny_llama(tie=tie).double()
    data = _batches(1, n=1, b=3, t=4)
    got = ml.compute_importance(ml.convert(model), data, progress=False)
    want = oracles.global_sample(model, data)
    for n in want:
        scale = want[n].abs().max().item()
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


def test_mas_steps_reduce_weighted_drift():
    torch.manual_seed(0)
    base = ml.convert(tiny_llama())
    task1, task2 = _batches(2, n=2), _batches(3, n=4)

    def finetune(model, mas, lam):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        model.train()
        for batch in task2 * 3:
            out = model(**batch, labels=batch["input_ids"])
            loss = out.loss
            opt.zero_grad()
            loss.backward()
            if mas is not None and lam > 0:
                mas.add_penalty_grad_()
            opt.step()
        return model

    mas = ml.MAS(base, lam=1.0, progress=False)
    mas.consolidate(task1)
    # the largest λ for which SGD on the penalty alone stays stable: lr·2λ·max Ω < 1
    lam_stable = 0.4 / (0.05 * max(o.max().item() for o in mas.importance.values()))
    drift = {}
    for lam in (0.0, lam_stable):
        model = copy.deepcopy(base)
        m = ml.MAS(model, lam=lam, progress=False)
        m.load_state_dict(mas.state_dict())
        m.lam = lam
        finetune(model, m, lam)
        probe = ml.MAS(model, lam=1.0, progress=False)
        probe.load_state_dict(mas.state_dict())
        drift[lam] = probe.penalty().item()
    assert drift[lam_stable] < 0.5 * drift[0.0], drift
