"""End to end: what a consolidation costs on a Llama, a GPT-2 and a ResNet-style CNN (random weights).

Each model is one group: a forward pass over the data and a forward+backward pass of Σ‖f‖² (the
yardsticks), then ``compute_importance`` with every estimator on the same model and data.
``extra_info`` carries each time as a multiple of the forward (``x_forward``) and of the
forward+backward (``x_forward_backward``) measured in the same session, and the extra peak memory of one
more run (``peak_extra_mib``). The same ratios, from one script run, are in ``bench/consolidation_cost.py``
and ``docs/performance.md``. ``MAS_BENCH_SIZE=real`` runs GPT-2 124M (full vocabulary) and a 336M-parameter
Llama instead, four batches of 4 × 128 tokens (``bench/real_size.py`` measures the same in fresh processes).
"""

from __future__ import annotations

import pytest
import torch

import mas_local as ml

from . import models
from .helpers import bench_device, bench_size, mean_seconds, peak_extra_mib, sync

transformers = pytest.importorskip("transformers")

DEVICE = bench_device()
SIZE = bench_size()

BUILDERS = {
    "llama": (lambda: models.llama(hidden=1024, layers=4, data=(8, 8, 256))) if SIZE == "gpu" else models.llama,
    "gpt2": models.gpt2,
    "resnet": models.resnet,
}
if SIZE == "real":
    BUILDERS = {"gpt2-124m": models.gpt2_124m, "llama-336m": models.llama_336m}
ESTIMATORS = [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample"), ("local", "batch")]
_yardsticks: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request):
    model, data = BUILDERS[request.param]()
    model = model.to(DEVICE)
    data = [{k: v.to(DEVICE) for k, v in b.items()} if isinstance(b, dict) else b.to(DEVICE) for b in data]
    return request.param, model, data


def _out(model, batch):
    y = model(**batch) if isinstance(batch, dict) else model(batch)
    return y.logits if hasattr(y, "logits") else y


def _record(benchmark, name: str, kind: str, fn=None) -> None:
    t = mean_seconds(benchmark)
    benchmark.extra_info["device"] = str(DEVICE)
    if fn is not None and t:  # timing enabled: one more run for the memory (the probe slows the run it watches)
        benchmark.extra_info["peak_extra_mib"] = round(peak_extra_mib(fn, DEVICE), 1)
    if not t:
        return
    if kind in ("forward", "forward_backward"):
        _yardsticks[name, kind] = t
    for base in ("forward", "forward_backward"):
        if (name, base) in _yardsticks and kind != base:
            benchmark.extra_info[f"x_{base}"] = t / _yardsticks[name, base]


def test_forward(benchmark, case):
    name, model, data = case
    benchmark.group = f"e2e {name}-{SIZE}"

    @torch.no_grad()
    def fn():
        for b in data:
            _out(model, b)
        sync(DEVICE)

    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, name, "forward", fn)


def test_forward_backward(benchmark, case):
    name, model, data = case
    benchmark.group = f"e2e {name}-{SIZE}"
    params = [p for p in model.parameters() if p.requires_grad]

    def fn():
        for b in data:
            torch.autograd.grad(_out(model, b).float().pow(2).sum(), params)
        sync(DEVICE)

    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, name, "forward_backward", fn)


@pytest.mark.parametrize("mode, estimator", ESTIMATORS, ids=[f"{m}-{e}" for m, e in ESTIMATORS])
def test_consolidate(benchmark, case, mode, estimator):
    name, model, data = case
    benchmark.group = f"e2e {name}-{SIZE}"

    def fn():
        omega = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
        sync(DEVICE)
        return omega

    omega = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(omega) == trainable and all(torch.isfinite(o).all() for o in omega.values())
    _record(benchmark, name, f"{mode}-{estimator}", fn)
