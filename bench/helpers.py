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
    size = os.environ.get("MAS_BENCH_SIZE") or ("gpu" if bench_device().type == "cuda" else "cpu")
    if size not in ("cpu", "gpu"):
        raise pytest.UsageError(f"MAS_BENCH_SIZE must be cpu or gpu, got {size!r}")
    return size


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so a timed call measures the kernels, not their launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mean_seconds(benchmark) -> float | None:
    """The measured mean of a finished benchmark (None when timing is disabled)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    return getattr(inner, "mean", None)
