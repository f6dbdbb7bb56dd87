"""Design "fused": ``Ω += α·|A|ᵀ|B|`` in one Triton GEMM with the abs on the loaded tiles (no pre-pass)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mas_local.kernels import abs_gemm as ag
from mas_local.kernels.launch import INTERPRET, TunedKernel, on_device, size_bucket


@triton.jit
def _fused_kernel(
    omega_ptr,
    a_ptr,
    b_ptr,
    n_out,
    n_in,
    n_rows,
    rows_bucket,
    a_stride_row,
    a_stride_out,
    b_stride_row,
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
    a_ptrs = a_ptr + ro.to(tl.int64)[:, None] * a_stride_out + rk.to(tl.int64)[None, :] * a_stride_row
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * b_stride_row + ri.to(tl.int64)[None, :] * b_stride_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(n_rows, BLOCK_K)):
        k_ok = rk < n_rows - k * BLOCK_K
        a = tl.load(a_ptrs, mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(tl.abs(a), tl.abs(b), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * a_stride_row
        b_ptrs += BLOCK_K * b_stride_row
    o_ptrs = omega_ptr + ro.to(tl.int64)[:, None] * o_stride_out + ri.to(tl.int64)[None, :] * o_stride_in
    mask = o_ok[:, None] & i_ok[None, :]
    tl.store(o_ptrs, tl.load(o_ptrs, mask=mask, other=0.0) + alpha * acc, mask=mask)


FUSED = TunedKernel(
    _fused_kernel,
    ag._GPU_CONFIGS,
    ["n_out", "n_in", "rows_bucket", "UPCAST", "PRECISION"],
    ["omega_ptr"],
    "a_ptr",
    ag.INTERPRET_CONFIG,
)


def abs_gemm_fused(omega, a, b, alpha: float, precision: str = "accurate") -> None:
    """The fused design (16-bit or fp32 operands of one dtype; "fast" runs as "accurate")."""
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    n_rows, n_out = a.shape
    n_in = b.shape[1]
    args = (
        omega,
        a,
        b,
        n_out,
        n_in,
        n_rows,
        size_bucket(n_rows),
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        omega.stride(0),
        omega.stride(1),
        float(alpha),
    )
    meta = dict(UPCAST=INTERPRET and a.dtype != torch.float32, PRECISION=ag.dot_precision(a.dtype, precision))
    grid = lambda m: (triton.cdiv(n_out, m["BLOCK_M"]) * triton.cdiv(n_in, m["BLOCK_N"]),)
    with on_device(omega.device):
        FUSED(grid, args, meta, omega.device)
