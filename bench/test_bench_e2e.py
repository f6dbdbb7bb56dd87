"""End to end: importance of a small Llama (random weights, no download) on one set of batches.

One group: a forward pass over the data and a forward+backward pass (the yardsticks),
then consolidation (``compute_importance``) with global ``sample``, global ``batch``
and local ``hebbian`` on the same model and data. ``extra_info`` carries each time
as a multiple of the forward pass (``x_forward``) measured in the same session.
"""

from __future__ import annotations

import pytest
import torch

import mas_local as ml

from .helpers import bench_device, bench_size, mean_seconds, sync

transformers = pytest.importorskip("transformers")
if not hasattr(ml, "compute_importance"):  # pragma: no cover - only before the core exists
    pytest.skip("mas_local.compute_importance is missing", allow_module_level=True)

DEVICE = bench_device()
SIZE = bench_size()

# model sizes, then (batches, batch size, sequence length)
CONFIGS = {
    "cpu": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024, data=(4, 8, 64)),
    "gpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=32000, data=(8, 8, 256)),
}
CONFIG = CONFIGS[SIZE]
_forward_seconds: dict[str, float] = {}


@pytest.fixture(scope="module")
def llama():
    cfg = dict(CONFIG)
    n_batches, batch, seq = cfg.pop("data")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=max(seq, 64), **cfg)
    model = transformers.LlamaForCausalLM(config).to(DEVICE).eval()
    gen = torch.Generator().manual_seed(1)
    data = [torch.randint(0, config.vocab_size, (batch, seq), generator=gen).to(DEVICE) for _ in range(n_batches)]
    return model, data


def _group(data) -> str:
    n = sum(x.shape[0] for x in data)
    return f"e2e llama-{SIZE} {n} seqs x {data[0].shape[1]} tokens"


def _info(benchmark, name: str) -> None:
    t = mean_seconds(benchmark)
    benchmark.extra_info["device"] = str(DEVICE)
    if t:
        if name == "forward":
            _forward_seconds["forward"] = t
        elif "forward" in _forward_seconds:
            benchmark.extra_info["x_forward"] = t / _forward_seconds["forward"]


def test_forward(benchmark, llama):
    model, data = llama
    benchmark.group = _group(data)

    @torch.no_grad()
    def fn():
        for x in data:
            model(input_ids=x)
        sync(DEVICE)

    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, "forward")


def test_forward_backward(benchmark, llama):
    model, data = llama
    benchmark.group = _group(data)

    def fn():
        for x in data:
            model(input_ids=x, labels=x).loss.backward()
        model.zero_grad(set_to_none=True)
        sync(DEVICE)

    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, "forward+backward")


@pytest.mark.parametrize(
    "mode, estimator", [("global", "sample"), ("global", "batch"), ("local", "hebbian")],
    ids=["global-sample", "global-batch", "local-hebbian"],
)
def test_consolidate(benchmark, llama, mode, estimator):
    model, data = llama
    benchmark.group = _group(data)

    def fn():
        omega = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
        sync(DEVICE)
        return omega

    omega = benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(o.numel() for o in omega.values()) == n_params  # every parameter got importance
    _info(benchmark, f"{mode}-{estimator}")
    benchmark.extra_info["params"] = n_params
