"""torch.compile: MAS and compute_importance look through OptimizedModule (and DDP around or inside it).

The compiled wrappers use the ``eager``/``aot_eager`` backends to keep CPU time low; they trace the
model with dynamo (and AOTAutograd) as any backend does. Gradients of the compiled model are
compared with the eager model's with float32 tolerances (rtol 1e-5): AOTAutograd may reorder sums.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

import mas_local as ml
from mas_local.distributed import unwrap
from tests import oracles
from tests.models import MLP


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP()
    g = torch.Generator().manual_seed(seed + 1)
    data = [torch.randn(5, 13, generator=g), torch.randn(3, 13, generator=g)]
    return model, data


@pytest.mark.parametrize("mode, estimator", [("global", "sample"), ("global", "batch"), ("local", "hebbian")])
def test_compute_importance_on_compiled_model(mode, estimator):
    model, data = _setup()
    compiled = torch.compile(model, backend="eager")
    assert unwrap(compiled) is model
    got = ml.compute_importance(compiled, data, mode=mode, estimator=estimator, progress=False)
    want = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
    assert list(got) == [n for n, _ in model.named_parameters()]  # no "_orig_mod." prefix
    for k in want:
        assert torch.equal(got[k], want[k])
    if (mode, estimator) == ("global", "sample"):
        ref = oracles.global_sample(model, data)
        for k in ref:
            torch.testing.assert_close(got[k].double(), ref[k], rtol=1e-5, atol=1e-7)


def test_mas_state_of_compiled_and_plain_model_is_interchangeable():
    model, data = _setup()
    compiled = torch.compile(model, backend="eager")
    mas = ml.MAS(compiled, progress=False)
    assert list(mas.params) == [n for n, _ in model.named_parameters()]
    omega = mas.consolidate(data)
    plain = ml.MAS(copy.deepcopy(model), progress=False)
    plain.load_state_dict(mas.state_dict())
    back = ml.MAS(torch.compile(copy.deepcopy(model), backend="eager"), progress=False)
    back.load_state_dict(plain.state_dict())
    for k, v in omega.items():
        assert torch.equal(plain.importance[k], v) and torch.equal(back.importance[k], v)


@pytest.mark.parametrize("how", ["penalty", "add_penalty_grad_"])
def test_training_the_compiled_model_with_the_penalty(how):
    """A few SGD steps on the compiled model equal the same steps on the eager model."""
    model, data = _setup()
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    runs = []
    for net, inner in ((compiled, model), (eager, eager)):
        mas = ml.MAS(net, lam=5.0, progress=False)
        mas.consolidate(data)
        opt = torch.optim.SGD(inner.parameters(), lr=0.05)
        values = []
        g = torch.Generator().manual_seed(9)
        for _ in range(3):
            x = torch.randn(4, 13, generator=g)
            opt.zero_grad()
            loss = (net(x) - 1.0).pow(2).mean()
            if how == "penalty":
                pen = mas.penalty()
                (loss + pen).backward()
            else:
                loss.backward()
                pen = mas.add_penalty_grad_()
            values.append(pen.detach())
            opt.step()
        runs.append((values, {n: p.detach().clone() for n, p in inner.named_parameters()}))
    (v_c, p_c), (v_e, p_e) = runs
    assert v_e[0] == 0 and v_e[-1] > 1e-6  # the parameters moved away from θ*, so the penalty works
    torch.testing.assert_close(torch.stack(v_c), torch.stack(v_e), rtol=1e-5, atol=1e-9)
    for k in p_e:
        torch.testing.assert_close(p_c[k], p_e[k], rtol=1e-5, atol=1e-7)


@pytest.fixture
def single_process_group():
    """A one-rank gloo group (DDP needs one); the pass then runs without syncing."""
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group of the caller's")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("nesting", ["ddp_of_compiled", "compiled_ddp"])
def test_ddp_and_compile_nested_either_way(single_process_group, nesting):
    model, data = _setup()
    if nesting == "ddp_of_compiled":
        wrapped = nn.parallel.DistributedDataParallel(torch.compile(model, backend="eager"))
    else:
        wrapped = torch.compile(nn.parallel.DistributedDataParallel(model), backend="eager")
    assert unwrap(wrapped) is model
    want = ml.compute_importance(model, data, progress=False)
    got = ml.compute_importance(wrapped, data, progress=False)
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    mas = ml.MAS(wrapped, progress=False)
    assert list(mas.params) == list(want)
    mas.consolidate(data)
    with torch.no_grad():
        model.fc1.weight.add_(0.1)
    wrapped(data[0]).pow(2).mean().backward()
    assert mas.add_penalty_grad_() > 0
