"""MAS: the penalty, the fused penalty gradient, accumulation across tasks, state dicts."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

import mas_local as ml
from tests.models import MLP


def _model_and_tasks(seed=0, tasks=3):
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 1)
    data = [[torch.randn(5, 13, generator=g), torch.randn(4, 13, generator=g)] for _ in range(tasks)]
    return model, data


def _perturb(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def test_penalty_value_and_gradient_match_formula():
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, lam=0.7, progress=False)
    omega = mas.consolidate(tasks[0])
    anchors = {n: p.detach().clone() for n, p in model.named_parameters()}
    _perturb(model)
    pen = mas.penalty()
    want = sum(0.7 * (omega[n] * (p - anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(pen, want)
    grads = torch.autograd.grad(pen, list(model.parameters()))
    for (n, p), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(g, 2 * 0.7 * omega[n] * (p.detach() - anchors[n]))


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_add_penalty_grad_equals_autograd(backend):
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, lam=1.3, backend=backend, progress=False)
    mas.consolidate(tasks[0])
    _perturb(model)
    x = torch.randn(6, 13)
    params = list(model.parameters())
    task_grads = torch.autograd.grad(model(x).pow(2).mean(), params)
    pen = mas.penalty()
    pen_grads = torch.autograd.grad(pen, params)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    model.fc2.weight.grad = None  # a parameter without .grad gets one
    value = mas.add_penalty_grad_()
    torch.testing.assert_close(value, pen.detach(), rtol=1e-6, atol=1e-8)
    for p, tg, pg in zip(params, task_grads, pen_grads):
        want = pg if p is model.fc2.weight else tg + pg
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7)


def test_penalty_is_zero_before_consolidation():
    model, _ = _model_and_tasks()
    mas = ml.MAS(model, progress=False)
    assert mas.penalty().item() == 0.0
    assert mas.add_penalty_grad_().item() == 0.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("accumulate", ["sum", "ema"])
def test_accumulation_over_three_tasks(accumulate):
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, accumulate=accumulate, alpha=0.3, progress=False)
    per_task = []
    for t, data in enumerate(tasks):
        per_task.append(mas.consolidate(data))
        _perturb(model, seed=t)
    for name in per_task[0]:
        o1, o2, o3 = (p[name] for p in per_task)
        if accumulate == "sum":
            want = o1 + o2 + o3
        else:
            want = 0.3 * (0.3 * o1 + 0.7 * o2) + 0.7 * o3
        torch.testing.assert_close(mas.importance[name], want)
        assert not torch.equal(o1, o2)
    assert mas.num_tasks == 3


def test_anchor_is_snapshot_at_last_consolidation():
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, progress=False)
    mas.consolidate(tasks[0])
    _perturb(model)
    mas.consolidate(tasks[1])
    for n, p in model.named_parameters():
        assert torch.equal(mas.anchors[n], p.detach())
    assert mas.penalty().item() == 0.0


def test_state_dict_round_trip_weights_only():
    model, tasks = _model_and_tasks()
    settings = dict(mode="local", accumulate="ema", alpha=0.25, lam=3.0)
    mas = ml.MAS(model, progress=False, **settings)
    mas.consolidate(tasks[0])
    mas.consolidate(tasks[1])
    buf = io.BytesIO()
    torch.save(mas.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    other = ml.MAS(model, progress=False, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings: no warning
        other.load_state_dict(state)
    assert (other.mode, other.estimator, other.accumulate, other.alpha, other.lam, other.num_tasks) == (
        "local",
        "hebbian",
        "ema",
        0.25,
        3.0,
        2,
    )
    for n in mas.importance:
        assert torch.equal(other.importance[n], mas.importance[n])
        assert torch.equal(other.anchors[n], mas.anchors[n])


def test_load_state_dict_keeps_the_constructor_settings_and_warns():
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, mode="local", accumulate="ema", alpha=0.25, lam=3.0, progress=False)
    mas.consolidate(tasks[0])
    other = ml.MAS(model, lam=0.5, progress=False)
    with pytest.warns(UserWarning, match=r"saved with mode='local', estimator='hebbian', accumulate='ema'") as rec:
        other.load_state_dict(mas.state_dict())
    assert "keeps its own settings" in str(rec[0].message) and "lam=0.5" in str(rec[0].message)
    assert (other.mode, other.estimator, other.accumulate, other.alpha, other.lam) == (
        "global",
        "sample",
        "sum",
        0.5,
        0.5,
    )
    assert other.config.mode == "global" and other.num_tasks == 1
    for n in mas.importance:
        assert torch.equal(other.importance[n], mas.importance[n])
    # the penalty uses this object's λ on the loaded Ω
    _perturb(model)
    want = sum(0.5 * (mas.importance[n] * (p - mas.anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(other.penalty(), want)


def test_state_dict_from_another_model_is_refused_and_changes_nothing():
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, progress=False)
    mas.consolidate(tasks[0])
    before = {k: v.clone() for k, v in mas.importance.items()}
    other = ml.MAS(nn.Sequential(nn.Linear(13, 5)), progress=False)
    other.consolidate([torch.randn(3, 13)])
    with pytest.raises(ValueError, match="does not match this model"):
        mas.load_state_dict(other.state_dict())
    bad = mas.state_dict()
    bad["importance"]["fc1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"fc1.weight.*shape"):
        mas.load_state_dict(bad)
    bad = mas.state_dict()
    bad["anchors"]["head.bias"] = torch.full((5,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        mas.load_state_dict(bad)
    for k in before:
        assert torch.equal(mas.importance[k], before[k])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lam=-1.0), "lam"),
        (dict(lam=float("inf")), "lam"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(mode="hebbian"), "unknown mode"),
        (dict(mode="global", estimator="hebbian"), "unknown estimator"),
        (dict(accumulate="mean"), "accumulate"),
    ],
)
def test_bad_settings(kwargs, match):
    model, _ = _model_and_tasks()
    with pytest.raises(ValueError, match=match):
        ml.MAS(model, **kwargs)


def test_failed_consolidation_changes_nothing():
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, progress=False)
    mas.consolidate(tasks[0])
    before = {k: v.clone() for k, v in mas.importance.items()}
    anchors = {k: v.clone() for k, v in mas.anchors.items()}
    with pytest.raises(ml.ImportanceError):
        mas.consolidate([torch.randn(4, 13), torch.full((2, 13), float("nan"))])
    assert mas.num_tasks == 1
    for k in before:
        assert torch.equal(mas.importance[k], before[k]) and torch.equal(mas.anchors[k], anchors[k])


def test_skipped_lists_frozen_parameters():
    model, tasks = _model_and_tasks()
    model.norm.weight.requires_grad_(False)
    mas = ml.MAS(model, progress=False)
    mas.consolidate(tasks[0])
    assert mas.skipped == ["norm.weight"] and "norm.weight" not in mas.importance


def test_tied_parameter_counted_once_in_penalty():
    from tests.models import Tied

    torch.manual_seed(0)
    model = Tied()
    mas = ml.MAS(model, progress=False)
    mas.consolidate([torch.randint(0, 11, (4, 3))])
    assert "head.weight" not in mas.importance and "emb.weight" in mas.importance
    _perturb(model)
    value = mas.penalty()
    want = sum((mas.importance[n] * (p - mas.anchors[n]) ** 2).sum() for n, p in model.named_parameters())
    torch.testing.assert_close(value, want)


def test_penalty_and_fused_grad_compile_fullgraph():
    """torch.compile traces MAS.penalty and the fused op (its fake kernel) without graph breaks."""
    model, tasks = _model_and_tasks()
    mas = ml.MAS(model, lam=0.9, progress=False)
    mas.consolidate(tasks[0])
    _perturb(model)
    eager = mas.penalty()
    compiled = torch.compile(mas.penalty, fullgraph=True)()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-8)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    value = torch.compile(mas.add_penalty_grad_, fullgraph=True)()
    torch.testing.assert_close(value, eager.detach(), rtol=1e-5, atol=1e-8)
    want = torch.autograd.grad(eager, list(model.parameters()))
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["auto", "torch", "ext"])
def test_float64_penalty_keeps_small_moves(backend):
    """θ − θ* is taken in the parameter's dtype: a float64 weight at 1.0 moved by 1e-9 (below float32's
    resolution at 1.0, ~6e-8) gives the exact 2λΩ·1e-9, from penalty() and from the fused gradient."""
    if backend == "ext" and "ext" not in ml.ops.backend.available_backends("cpu"):
        backend = "auto"  # without the extension, auto is what a user gets; the case is still checked
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(1.0)
    mas = ml.MAS(model, lam=1.0, backend=backend, progress=False)
    mas.consolidate([torch.randn(3, 1, dtype=torch.float64)])
    mas.importance["weight"].fill_(2.0)  # Ω = 2 (stored float32: exact)
    with torch.no_grad():
        model.weight.add_(1e-9)
    pen = mas.penalty()
    (g,) = torch.autograd.grad(pen, [model.weight])
    assert g.dtype == torch.float64
    torch.testing.assert_close(g, torch.full_like(g, 4e-9), rtol=1e-6, atol=0)
    assert pen.item() == pytest.approx(2.0 * 1e-18, rel=1e-6)
    model.weight.grad = None
    mas.add_penalty_grad_()
    torch.testing.assert_close(model.weight.grad, torch.full_like(g, 4e-9), rtol=1e-6, atol=0)
