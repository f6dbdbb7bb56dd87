"""Device and size selection for the benchmark suites (see ``bench/conftest.py``)."""

from __future__ import annotations

import os

import pytest
import torch


def bench_device() -> torch.device:
    name = os.environ.get("MAS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("MAS_BENCH_DEVICE=cuda but torch sees no CUDA GPU")
    return dev


def bench_size() -> str:
    """``cpu`` (small models), ``gpu`` (larger ones) or ``real`` (GPT-2 124M and a 336M Llama: minutes per
    consolidation on a CPU)."""
    size = os.environ.get("MAS_BENCH_SIZE") or ("gpu" if bench_device().type == "cuda" else "cpu")
    if size not in ("cpu", "gpu", "real"):
        raise pytest.UsageError(f"MAS_BENCH_SIZE must be cpu, gpu or real, got {size!r}")
    return size


def peak_extra_mib(fn, device: torch.device) -> float:
    """Extra peak memory of one ``fn()`` above the level before it: CUDA's peak counter on a GPU, the C heap
    sampled after every aten op on the CPU (``bench/consolidation_cost.py``; tracemalloc does not see torch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from bench.consolidation_cost import _PeakHeap

    with _PeakHeap() as probe:
        fn()
    return probe.peak / 2**20


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a timed call measures the kernels, not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_seconds(benchmark) -> float | None:
    """The measured mean of a finished benchmark (None when timing is disabled)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return getattr(inner, "mean", None)
