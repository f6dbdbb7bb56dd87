"""Shared settings of the benchmark suites.

``MAS_BENCH_DEVICE``  ``cpu`` or ``cuda`` (default: ``cuda`` when a GPU is visible).
``MAS_BENCH_SIZE``    ``cpu`` (small shapes, seconds on a 2-core machine), ``gpu``
                      (the GPU table's sizes, bench/gpu_table.py), or ``real`` (the e2e group on GPT-2
                      124M and a 336M Llama, minutes on a CPU); default follows the device.
``MAS_BENCH_THREADS`` torch CPU threads (default: torch's own choice). On a shared
                      CPU, 1 avoids oversubscription, which otherwise dominates timings.

Run: ``make bench`` (CPU set) or
``MAS_BENCH_SIZE=gpu pytest -q bench --benchmark-only --benchmark-json=bench/results/<name>.json``.
"""

from __future__ import annotations

import os

import pytest
import torch

from .helpers import bench_device, bench_size

if os.environ.get("MAS_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["MAS_BENCH_THREADS"]))


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def size() -> str:
    return bench_size()


def pytest_report_header(config):
    return f"mas-local bench: device={bench_device()} size={bench_size()} torch={torch.__version__}"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record how busy the machine was: timings on a shared CPU move with its load."""
    try:
        machine_info["load_average_1_5_15"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    machine_info["torch_threads"] = torch.get_num_threads()
