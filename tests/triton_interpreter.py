"""Shared set-up of the test modules that run the Triton kernels (imported first by each of them).

Without CUDA the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1`` is
set here before ``triton`` is imported. If another module of the session imported
triton earlier without it, the kernels cannot run in this process: the module then
runs again in a fresh process (``rerun_in_fresh_process``) and its other tests skip.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

K = importlib.import_module("mas_local.kernels")
DEV = torch.device("cuda" if CUDA else "cpu")
RERUN = not CUDA and not K.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA and not K.INTERPRET and not RERUN:
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run here", allow_module_level=True)

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real compilation, tensor cores, fp8)")


@pytest.fixture(autouse=True)
def fresh_process_guard(request):
    """Skip every test but the rerun when this process cannot run the kernels."""
    if RERUN and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; covered by test_in_fresh_process")


def rerun_in_fresh_process(path: str) -> None:
    """Run the test module at ``path`` in a new interpreter with ``TRITON_INTERPRET=1``; assert it passes."""
    if not RERUN:
        pytest.skip("this process runs the kernels directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", path]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0, device=None):
    """Fresh random data (never zeros), made on the CPU then moved to the test device."""
    return torch.randn(*shape, generator=gen(seed)).to(device=device or DEV, dtype=dtype)


def rand_omega(*shape, seed=1, device=None):
    """Ω pre-filled with random positive values, to test accumulation."""
    return (torch.rand(*shape, generator=gen(seed)) + 0.5).to(device or DEV)


def assert_acc_close(got, before, want, rtol):
    """``got`` vs ``want`` (both Ω after the op) with atol on the scale of the increment."""
    scale = (want - before).abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))
