"""Every op of :mod:`mas_local.ops` against the torch code a user would write, side by side.

One ``benchmark.group`` per op and shape; in each group the naive baseline(s) and the
op on every backend present on the device (``mas_local.backend.available_backends``;
Triton on CPU only under ``TRITON_INTERPRET=1``). Throughput goes to ``extra_info``:
TFLOP/s for the GEMM-shaped ops, GB/s for the penalty (20 bytes per fp32 parameter:
θ, θ*, Ω, grad read, grad written). Inputs are fresh random tensors (never zeros).
CUDA calls are synchronised inside the timed function.
"""

from __future__ import annotations

import os

import pytest
import torch

from mas_local import ops
from mas_local.ops.backend import available_backends

from .helpers import bench_device, bench_size, mean_seconds, sync

DEVICE = bench_device()
SIZE = bench_size()


def _backends() -> list[str]:
    found = available_backends(DEVICE)
    if DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        found = [b for b in found if b != "triton"]
    return found


BACKENDS = _backends()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# (R, out, in, dtype) for Ω[out, in] += |A[R, out]|ᵀ |B[R, in]|
GEMM_SHAPES = {
    "cpu": [(1024, 256, 256, "fp32"), (4096, 512, 384, "fp32")],
    "gpu": [(16384, 4096, 4096, "bf16"), (16384, 4096, 4096, "fp32"), (4096, 1024, 4096, "bf16")],
}["gpu" if SIZE == "gpu" else "cpu"]  # real: model sizes only (test_bench_e2e.py)
# (B, T, out, in, dtype) for Ω[out, in] += Σ_b |A_bᵀ B_b|
PER_SAMPLE_SHAPES = {
    "cpu": [(8, 64, 128, 128, "fp32"), (16, 32, 256, 192, "fp32")],
    "gpu": [(32, 512, 2048, 2048, "bf16"), (64, 196, 576, 256, "fp32")],
}["gpu" if SIZE == "gpu" else "cpu"]  # real: model sizes only (test_bench_e2e.py)
# (number of tensors, total parameters) for the penalty
PENALTY_SHAPES = {
    "cpu": [(8, 1 << 20), (64, 1 << 22)],
    "gpu": [(64, 1 << 28)],
}["gpu" if SIZE == "gpu" else "cpu"]  # real: model sizes only (test_bench_e2e.py)


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float32).to(dtype)


def _info(benchmark, flops: float | None = None, nbytes: float | None = None, **extra) -> None:
    t = mean_seconds(benchmark)
    benchmark.extra_info.update(extra)
    benchmark.extra_info["device"] = str(DEVICE)
    if t:
        if flops is not None:
            benchmark.extra_info["tflops"] = flops / t / 1e12
        if nbytes is not None:
            benchmark.extra_info["gb_per_s"] = nbytes / t / 1e9


# --------------------------------------------------------------------------- abs-GEMM


@pytest.mark.parametrize("impl", ["naive", "plain-gemm", *BACKENDS])
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_abs_gemm_acc(benchmark, shape, impl):
    r, n_out, n_in, dt = shape
    dtype = DTYPES[dt]
    a, b = _rand(r, n_out, dtype=dtype), _rand(r, n_in, dtype=dtype)
    omega = _rand(n_out, n_in).abs_()
    alpha = 1.0 / r
    benchmark.group = f"abs_gemm_acc R={r} out={n_out} in={n_in} {dt}"

    if impl == "naive":  # what users write: abs, GEMM in the operand dtype, accumulate in fp32

        def fn():
            omega.add_((a.abs().t() @ b.abs()).float(), alpha=alpha)
            sync(DEVICE)
    elif impl == "plain-gemm":  # the yardstick: the GEMM alone, no abs, no accumulation

        def fn():
            a.t() @ b
            sync(DEVICE)
    else:

        def fn():
            ops.abs_gemm_acc_(omega, a, b, alpha, impl)
            sync(DEVICE)

    benchmark(fn)
    _info(benchmark, flops=2.0 * r * n_out * n_in, impl=impl, dtype=dt)


# --------------------------------------------------------------------------- per-sample abs


@pytest.mark.parametrize("impl", ["naive", "batch-gemm", *BACKENDS])
@pytest.mark.parametrize("shape", PER_SAMPLE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_sample_abs_acc(benchmark, shape, impl):
    bsz, t, n_out, n_in, dt = shape
    dtype = DTYPES[dt]
    a, b = _rand(bsz, t, n_out, dtype=dtype), _rand(bsz, t, n_in, dtype=dtype)
    omega = _rand(n_out, n_in).abs_()
    benchmark.group = f"per_sample_abs_acc B={bsz} T={t} out={n_out} in={n_in} {dt}"

    if impl == "naive":  # einsum materialises [B, out, in], then abs and sum over samples

        def fn():
            omega.add_(torch.einsum("bto,bti->boi", a, b).abs().float().sum(0))
            sync(DEVICE)
    elif impl == "batch-gemm":  # the yardstick: the batch gradient GEMM of the same shape

        def fn():
            a.reshape(-1, n_out).t() @ b.reshape(-1, n_in)
            sync(DEVICE)
    else:

        def fn():
            ops.per_sample_abs_acc_(omega, a, b, 1.0, impl)
            sync(DEVICE)

    benchmark(fn)
    _info(
        benchmark,
        flops=2.0 * bsz * t * n_out * n_in,
        impl=impl,
        dtype=dt,
        naive_extra_bytes=bsz * n_out * n_in * a.element_size(),
    )


# --------------------------------------------------------------------------- penalty


@pytest.mark.parametrize("impl", ["autograd", "foreach", *BACKENDS])
@pytest.mark.parametrize("shape", PENALTY_SHAPES, ids=lambda s: f"{s[0]}t-{s[1]}p")
def test_penalty_grad(benchmark, shape, impl):
    n_tensors, total = shape
    per = total // n_tensors
    sizes = [per + (i % 3) * 7 for i in range(n_tensors)]  # ragged, not a multiple of any block size
    params = [_rand(n) for n in sizes]
    anchors = [p + 0.01 * _rand(p.numel()) for p in params]
    omegas = [_rand(n).abs_() for n in sizes]
    grads = [_rand(n) for n in sizes]
    lam = 0.5
    n_params = sum(sizes)
    benchmark.group = f"penalty_grad {n_tensors} tensors {n_params} params fp32"

    if impl == "autograd":  # the differentiable penalty and its backward
        leaves = [p.clone().requires_grad_(True) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()

        def fn():
            total_ = sum((o * (p - a).pow(2)).sum() for p, a, o in zip(leaves, anchors, omegas))
            (lam * total_).backward()
            sync(DEVICE)
    elif impl == "foreach":  # hand-written multi-tensor version with torch._foreach ops

        def fn():
            diff = torch._foreach_sub(params, anchors)
            w = torch._foreach_mul(diff, omegas)
            torch._foreach_add_(grads, w, alpha=2.0 * lam)
            value = lam * torch.stack([(x * d).sum() for x, d in zip(w, diff)]).sum()
            sync(DEVICE)
            return value
    else:

        def fn():
            value = ops.penalty_grad_(grads, params, anchors, omegas, lam, impl)
            sync(DEVICE)
            return value

    benchmark(fn)
    _info(benchmark, nbytes=20.0 * n_params, impl=impl, params=n_params)
