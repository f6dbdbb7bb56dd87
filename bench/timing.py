"""What the CPU benchmark scripts share: min-of-interleaved timing and the header line of a results table."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from collections.abc import Callable

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def git_commit() -> str:
    """The short commit of this checkout, ``+dirty`` when it has uncommitted changes."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True)
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return os.environ.get("MAS_LOCAL_COMMIT", "unknown (no git)")


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call: min over ``repeats`` rounds, the functions interleaved within each round (after one
    warm-up each), so that a slow spell of a shared machine hits all of them alike."""
    for fn in fns.values():
        fn()
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times


def emit(text: str, out: str | None) -> None:
    """Print a result table, and write it to ``out`` when given (for ``bench/results/``)."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def header(title: str, *details: str) -> str:
    """``# title (date, machine, threads, torch, commit, details...)``."""
    parts = [
        str(datetime.date.today()),
        platform.processor() or platform.machine(),
        f"{torch.get_num_threads()} threads",
        f"torch {torch.__version__}",
        f"commit {git_commit()}",
        *details,
    ]
    return f"# {title} ({', '.join(parts)})"
