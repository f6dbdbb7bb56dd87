"""Peak extra memory of a call: the most memory it held at once beyond what was allocated before it.

On CUDA this is the caching allocator's peak counter. On the CPU nothing in the process
counts torch's allocations (tracemalloc does not see them; RSS keeps freed pages), so the call
runs under torch's profiler with ``profile_memory=True``, and the peak is read off the
allocation and free events in time order. The profiler slows the call down: time it separately.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs a line when it starts and stops."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[Any, int]:
    """Run ``fn()``; return its result and the peak of (bytes allocated − bytes allocated before) during it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr_fd():
        prof.start()
    try:
        out = fn()
    finally:
        with _quiet_stderr_fd():
            prof.stop()
    # "[memory]" events carry the signed size of each allocation (+) and free (−) of the CPU allocator
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return out, peak
