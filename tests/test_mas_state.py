"""No surprises in MAS: parameter-set changes, what load_state_dict accepts, pass checkpoints, detached Ω.

Every refusal is checked to leave the MAS object (Ω, θ*, task count, settings) and the model
(parameters, buffers, train/eval flags) exactly as they were.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from torch import nn

import mas_local as ml
from tests.models import MLP


def _setup(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 1)
    tasks = [[torch.randn(5, 13, generator=g), torch.randn(4, 13, generator=g)] for _ in range(3)]
    return model, tasks, ml.MAS(model, progress=False, **kwargs)


def _perturb(params, seed=7, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))


def _formula(mas, model, lam=1.0):
    """λ Σ Ω (θ − θ*)² over the model's trainable parameters, from MAS's tables."""
    return sum(
        lam * (mas.importance[n] * (p - mas.anchors[n]) ** 2).sum()
        for n, p in model.named_parameters()
        if p.requires_grad
    )


def _snapshot(mas, model):
    return {
        "importance": {k: v.clone() for k, v in mas.importance.items()},
        "anchors": {k: v.clone() for k, v in mas.anchors.items()},
        "params": dict(mas.params),
        "settings": (mas.num_tasks, mas.lam, mas.mode, mas.estimator, mas.accumulate, mas.alpha, mas.config),
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
    }


def _assert_unchanged(before, mas, model):
    after = _snapshot(mas, model)
    assert after["settings"] == before["settings"]
    assert after["params"].keys() == before["params"].keys()
    assert all(after["params"][k] is before["params"][k] for k in before["params"])
    for key in ("importance", "anchors", "model"):
        assert after[key].keys() == before[key].keys()
        assert all(torch.equal(after[key][k], before[key][k]) for k in before[key]), key
    assert after["training"] == before["training"]


# ------------------------------------------------------------------ (a) the parameter set changes
def test_replaced_head_warns_once_and_refresh_params_regularises_the_new_one(caplog):
    model, tasks, mas = _setup()
    first = mas.consolidate(tasks[0])
    old_head = model.head
    model.head = nn.Linear(11, 5)  # same names, new parameter objects
    with pytest.warns(UserWarning, match=r"replaced .*\['head.weight', 'head.bias'\].*refresh_params"):
        stale = mas.penalty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once, not at every step
        mas.penalty()
        mas.add_penalty_grad_()
    assert mas.params["head.weight"] is old_head.weight and stale.item() == 0.0
    with caplog.at_level(logging.INFO, logger="mas_local"):
        changes = mas.refresh_params()
    assert changes == {"added": [], "removed": [], "replaced": ["head.weight", "head.bias"]}
    assert "now regularises" in caplog.text and "head.weight" in caplog.text
    assert mas.params["head.weight"] is model.head.weight
    assert not mas.importance["head.weight"].any() and torch.equal(mas.anchors["head.bias"], model.head.bias)
    for k in first:
        if not k.startswith("head."):
            assert torch.equal(mas.importance[k], first[k])
    # the new head is not penalised until estimated; the rest is, by the formula
    _perturb([model.head.weight])
    assert mas.penalty().item() == 0.0
    _perturb([model.fc1.weight])
    torch.testing.assert_close(mas.penalty(), _formula(mas, model))
    second = mas.consolidate(tasks[1])
    assert torch.equal(mas.importance["head.weight"], second["head.weight"])  # 0 + Ω of this task
    assert second["head.weight"].abs().sum() > 0


@pytest.mark.parametrize("accumulate", ["sum", "ema"])
def test_unfrozen_parameters_warn_and_consolidate_includes_them(accumulate):
    torch.manual_seed(0)
    model = MLP()
    model.norm.weight.requires_grad_(False)
    _, tasks, _ = _setup()
    mas = ml.MAS(model, accumulate=accumulate, alpha=0.3, progress=False)
    assert mas.skipped == ["norm.weight"]
    first = mas.consolidate(tasks[0])
    model.norm.weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"added \(trainable but not regularised\): \['norm.weight'\]"):
        mas.penalty()
    with pytest.warns(UserWarning, match=r"norm.weight.*consolidate\(\) regularises the current ones"):
        second = mas.consolidate(tasks[1])
    want = ml.compute_importance(model, tasks[1], progress=False)
    torch.testing.assert_close(second["norm.weight"], want["norm.weight"])
    assert second["norm.weight"].abs().sum() > 0
    # a new parameter had Ω = 0 so far: sum gives Ω_new, ema blends Ω_new with 0
    factor = 1.0 if accumulate == "sum" else 0.7
    torch.testing.assert_close(mas.importance["norm.weight"], factor * second["norm.weight"])
    blend = (lambda a, b: a + b) if accumulate == "sum" else (lambda a, b: 0.3 * a + 0.7 * b)
    torch.testing.assert_close(mas.importance["fc1.weight"], blend(first["fc1.weight"], second["fc1.weight"]))
    assert mas.skipped == [] and list(mas.params) == [n for n, _ in model.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mas.penalty()


def test_removed_module_is_dropped_and_state_loads_into_the_new_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    mas = ml.MAS(model, progress=False)
    mas.consolidate([torch.randn(4, 6)])
    model[2] = nn.Identity()
    with pytest.warns(UserWarning, match=r"removed \(no longer in the model\): \['2.weight', '2.bias'\]"):
        mas.add_penalty_grad_()
    assert mas.refresh_params()["removed"] == ["2.weight", "2.bias"]
    assert list(mas.importance) == list(mas.anchors) == list(mas.params) == ["0.weight", "0.bias", "4.weight", "4.bias"]
    fresh = ml.MAS(model, progress=False)
    fresh.load_state_dict(mas.state_dict())
    assert fresh.num_tasks == 1 and all(torch.equal(fresh.importance[k], v) for k, v in mas.importance.items())


def test_parameters_frozen_later_keep_their_omega_and_are_not_penalised():
    model, tasks, mas = _setup()
    first = mas.consolidate(tasks[0])
    anchor = mas.anchors["fc1.weight"].clone()
    model.fc1.weight.requires_grad_(False)
    _perturb([model.fc1.weight, model.head.weight])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # freezing is not a change that needs a warning
        value = mas.penalty()
        torch.testing.assert_close(value, _formula(mas, model))  # fc1.weight left out while frozen
        model.zero_grad(set_to_none=True)
        mas.add_penalty_grad_()
        assert model.fc1.weight.grad is None  # no gradient (an optimizer would move it) for a frozen one
        mas.consolidate(tasks[1])
    assert torch.equal(mas.importance["fc1.weight"], first["fc1.weight"]) and torch.equal(
        mas.anchors["fc1.weight"], anchor
    )
    assert not torch.equal(mas.importance["fc1.bias"], first["fc1.bias"])


def test_failed_consolidation_after_a_change_commits_no_refresh():
    model, tasks, mas = _setup()
    mas.consolidate(tasks[0])
    model.head = nn.Linear(11, 5)
    before = _snapshot(mas, model)
    with pytest.warns(UserWarning, match="replaced"), pytest.raises(ml.ImportanceError):
        mas.consolidate([torch.full((3, 13), float("nan"))])
    _assert_unchanged(before, mas, model)


def test_penalty_check_does_not_break_a_fullgraph_compile():
    model, tasks, mas = _setup()
    mas.consolidate(tasks[0])  # the parameter check is due at the next penalty call
    _perturb(model.parameters())
    compiled = torch.compile(mas.penalty, fullgraph=True, backend="eager")()
    torch.testing.assert_close(compiled, _formula(mas, model))


# ------------------------------------------------------------------ (b, c) load_state_dict
@pytest.mark.parametrize(
    "table, value, match",
    [
        ("importance", -1e-3, r"negative values in importance\['fc1.weight'\]"),
        ("importance", float("inf"), r"NaN/Inf values in importance\['fc1.weight'\]"),
        ("anchors", float("nan"), r"NaN/Inf values in anchors\['fc1.weight'\]"),
    ],
)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(table, value, match):
    model, tasks, mas = _setup(lam=2.0)
    mas.consolidate(tasks[0])
    donor = ml.MAS(copy.deepcopy(model), lam=5.0, mode="local", progress=False)
    donor.consolidate(tasks[1])
    state = donor.state_dict()
    state[table]["fc1.weight"][1, 2] = value
    before = _snapshot(mas, model)
    with pytest.raises(ValueError, match=match):
        mas.load_state_dict(state)
    _assert_unchanged(before, mas, model)


def test_load_state_dict_refuses_a_bad_task_count():
    model, tasks, mas = _setup()
    mas.consolidate(tasks[0])
    before = _snapshot(mas, model)
    for bad in (-1, 1.5, "2"):
        state = mas.state_dict()
        state["num_tasks"] = bad
        with pytest.raises(ValueError, match="num_tasks"):
            mas.load_state_dict(state)
    _assert_unchanged(before, mas, model)


# ------------------------------------------------------------------ (d) pass checkpoints
class _Interrupt(Exception):
    pass


def _interrupted(batches, after):
    for i, b in enumerate(batches):
        if i == after:
            raise _Interrupt
        yield b


def _bad_checkpoint(kind, path, tasks):
    if kind == "truncated":
        _, _, other = _setup()
        with pytest.raises(_Interrupt):
            other.consolidate(_interrupted(tasks[0] * 2, 3), checkpoint_path=path, checkpoint_every=1)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "plain_dict":
        torch.save({"weights": torch.ones(3), "step": 4}, path)
    elif kind == "tensor":
        torch.save(torch.ones(3), path)
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    else:  # another model's checkpoint for the same task (task 1)
        other = ml.MAS(nn.Sequential(nn.Linear(13, 4)), progress=False)
        other.consolidate(tasks[2])
        with pytest.raises(_Interrupt):
            other.consolidate(_interrupted(tasks[0] * 2, 2), checkpoint_path=path, checkpoint_every=1)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("truncated", "cannot read the importance-pass checkpoint .*truncated or not a mas-local"),
        ("text", "cannot read the importance-pass checkpoint"),
        ("plain_dict", "is not a mas-local importance-pass checkpoint"),
        ("tensor", "is not a mas-local importance-pass checkpoint"),
        ("other_model", "cannot resume from the importance-pass checkpoint .*another model"),
    ],
)
def test_bad_pass_checkpoint_is_refused_naming_the_file(tmp_path, kind, match):
    model, tasks, mas = _setup()
    mas.consolidate(tasks[0])
    path = tmp_path / "pass.pt"
    _bad_checkpoint(kind, path, tasks)
    model.train()
    before = _snapshot(mas, model)
    content = path.read_bytes()
    with pytest.raises(ValueError, match=match) as err:
        mas.consolidate(tasks[1], checkpoint_path=path)
    assert str(path) in str(err.value) and "remove it" in str(err.value)
    _assert_unchanged(before, mas, model)
    assert path.read_bytes() == content  # the user's file is left alone


# ------------------------------------------------------------------ (e) detached Ω
@pytest.mark.parametrize("mode, estimator", [("global", "sample"), ("global", "batch"), ("local", "hebbian")])
def test_omega_is_detached(mode, estimator):
    model, tasks, mas = _setup(mode=mode, estimator=estimator)
    assert model.norm.weight.requires_grad
    results = [mas.consolidate(tasks[0]), mas.importance, mas.anchors]
    results.append(ml.compute_importance(model, tasks[1], mode=mode, estimator=estimator, progress=False))
    for table in results:
        assert table["norm.weight"].abs().sum() > 0
        assert all(not t.requires_grad and t.grad_fn is None for t in table.values())
    # commit of an Ω that carries a graph returns and stores it detached
    graph = {n: p * 2 for n, p in model.named_parameters()}
    out = mas.commit(graph)
    assert all(not t.requires_grad for t in out.values()) and all(not t.requires_grad for t in mas.importance.values())
