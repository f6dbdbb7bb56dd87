"""Design "nested" of the per-sample op: the T-reduction loop restarts for every sample.

The library's kernel runs one flat loop over (sample, k-step) pairs so the load
pipeline keeps streaming across sample boundaries; this variant (the planning
notes' simple kernel, 3.1× naive there) drains and refills it per sample. One
program per Ω tile, no batch split: it is timed on shapes with enough tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mas_local.kernels import abs_gemm as ag
from mas_local.kernels import per_sample_abs as ps
from mas_local.kernels.launch import INTERPRET, TunedKernel, on_device, size_bucket


@triton.jit
def _nested_kernel(
    omega_ptr,
    a_ptr,
    b_ptr,
    n_samples,
    seq_len,
    seq_bucket,
    n_out,
    n_in,
    a_stride_sample,
    a_stride_seq,
    a_stride_out,
    b_stride_sample,
    b_stride_seq,
    b_stride_in,
    o_stride_out,
    o_stride_in,
    alpha,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = ag.grouped_tile(tl.program_id(0), n_out, n_in, BLOCK_M, BLOCK_N, GROUP_M)
    ro = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    o_ok = ro < n_out
    i_ok = ri < n_in
    a_tile = ro.to(tl.int64)[:, None] * a_stride_out + rk.to(tl.int64)[None, :] * a_stride_seq
    b_tile = rk.to(tl.int64)[:, None] * b_stride_seq + ri.to(tl.int64)[None, :] * b_stride_in
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a_sample = a_ptr
    b_sample = b_ptr
    for _ in range(0, n_samples):
        a_ptrs = a_sample + a_tile
        b_ptrs = b_sample + b_tile
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(seq_len, BLOCK_K)):
            k_ok = rk < seq_len - k * BLOCK_K
            a = tl.load(a_ptrs, mask=o_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & i_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            a_ptrs += BLOCK_K * a_stride_seq
            b_ptrs += BLOCK_K * b_stride_seq
        total += tl.abs(acc)
        a_sample += a_stride_sample
        b_sample += b_stride_sample
    o_ptrs = omega_ptr + ro.to(tl.int64)[:, None] * o_stride_out + ri.to(tl.int64)[None, :] * o_stride_in
    mask = o_ok[:, None] & i_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=mask, other=0.0) + alpha * total, mask=mask)


NESTED = TunedKernel(
    _nested_kernel,
    ps._GPU_CONFIGS,
    ["n_out", "n_in", "seq_bucket", "UPCAST", "PRECISION"],
    ["omega_ptr"],
    "a_ptr",
    ps.INTERPRET_CONFIG,
)


def per_sample_nested(omega, a, b, alpha: float, precision: str = "accurate") -> None:
    """The nested-loop design (operands of one dtype; "fast" runs as "accurate")."""
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    nb, t, m = a.shape
    n = b.shape[2]
    args = (
        omega,
        a,
        b,
        nb,
        t,
        size_bucket(t),
        m,
        n,
        a.stride(0),
        a.stride(1),
        a.stride(2),
        b.stride(0),
        b.stride(1),
        b.stride(2),
        omega.stride(0),
        omega.stride(1),
        float(alpha),
    )
    meta = dict(UPCAST=INTERPRET and a.dtype != torch.float32, PRECISION=ag.dot_precision(a.dtype, precision))
    grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    with on_device(omega.device):
        NESTED(grid, args, meta, omega.device)
