"""Triton per-sample abs accumulate: ``Ω[out, in] += α · Σ_b |A_bᵀ B_b|`` (A ``[B, T, out]``, B ``[B, T, in]``).

Design: one program owns a ``[BLOCK_M, BLOCK_N]`` tile of Ω and keeps the running
``Σ_b |·|`` of that tile in registers. It runs one loop over all (sample, k-step)
pairs, so the loads keep streaming across sample boundaries: ``tl.dot`` accumulates
the T-reduction ``A_bᵀ B_b`` of the tile in fp32, and at each sample's last k-step
its ``|·|`` is added to the running sum. After the last sample it loads the Ω tile,
adds α times the sum and stores it once. The ``[B, out, in]`` per-sample tensor
never exists. (A variant that restarts the T-loop per sample is kept in
``bench/designs/`` for comparison.)

Occupancy: when Ω has fewer 128×128 tiles than the GPU has SMs, the batch is split
over a second grid axis into ``split`` contiguous ranges of samples; each range
writes its tile sum to its own slice of an fp32 partial buffer ``[split, out, in]``
(no atomics), and a second kernel adds ``α · Σ_s partial[s]`` to Ω in the fixed
order s = 0, 1, …. The buffer is capped at :data:`PARTIAL_BYTES` (64 MiB).

Precision (``docs/triton.md``): fp16/bf16 operands are used as given (exact
products, fp32 accumulation) in every mode; fp32 operands run ``tl.dot`` with
``input_precision="ieee"`` for ``"exact"``, ``"tf32"`` for ``"accurate"``, and are
rounded to bf16 in registers for ``"fast"`` (there is no fp8 path for this op).
Offsets are 64-bit (T·out may pass 2³¹). Any strides.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from mas_local.ops import reference

from .abs_gemm import dot_precision, grouped_tile
from .launch import INTERPRET, KERNEL_DTYPES, TunedKernel, notice, notice_reference, on_device, size_bucket

#: Upper bound of the partial buffer of a split batch (bytes).
PARTIAL_BYTES = 64 << 20
GPU_TILE = 128


@triton.jit
def _per_sample_kernel(
    out_ptr,
    a_ptr,
    b_ptr,
    n_samples,
    seq_len,
    seq_bucket,  # autotune key only (the bucketed seq_len)
    n_out,
    n_in,
    per_split,
    a_stride_sample,
    a_stride_seq,
    a_stride_out,
    b_stride_sample,
    b_stride_seq,
    b_stride_in,
    out_stride_split,
    out_stride_out,
    out_stride_in,
    alpha,
    ACCUM: tl.constexpr,
    UPCAST: tl.constexpr,
    TO_BF16: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_out, n_in, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    ro = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    o_ok = ro < n_out
    i_ok = ri < n_in
    ro64 = ro.to(tl.int64)
    ri64 = ri.to(tl.int64)
    rk64 = rk.to(tl.int64)
    a_tile = ro64[:, None] * a_stride_out + rk64[None, :] * a_stride_seq  # [BLOCK_M, BLOCK_K] of A_bᵀ
    b_tile = rk64[:, None] * b_stride_seq + ri64[None, :] * b_stride_in  # [BLOCK_K, BLOCK_N] of B_b
    b_lo = split.to(tl.int64) * per_split
    b_hi = tl.minimum(b_lo + per_split, n_samples)
    n_k = tl.cdiv(seq_len, BLOCK_K).to(tl.int64)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, (b_hi - b_lo) * n_k):
        sample = b_lo + it // n_k
        k0 = (it % n_k) * BLOCK_K  # int64: k0 · stride may pass 2³¹
        k_ok = rk < seq_len - k0
        a = tl.load(a_ptr + sample * a_stride_sample + k0 * a_stride_seq + a_tile,
                    mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + sample * b_stride_sample + k0 * b_stride_seq + b_tile,
                    mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        if TO_BF16:  # precision="fast" on fp32 operands
            a = a.to(tl.bfloat16)
            b = b.to(tl.bfloat16)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if it % n_k == n_k - 1:
            total += tl.abs(acc)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    mask = o_ok[:, None] & i_ok[None, :]
    o_ptrs = out_ptr + split.to(tl.int64) * out_stride_split
    o_ptrs += ro64[:, None] * out_stride_out + ri64[None, :] * out_stride_in
    if ACCUM:
        omega = tl.load(o_ptrs, mask=mask, other=0.0)
        tl.store(o_ptrs, omega + alpha * total, mask=mask)
    else:
        tl.store(o_ptrs, total, mask=mask)


@triton.jit
def _reduce_partials_kernel(omega_ptr, part_ptr, numel, n_split, alpha, BLOCK: tl.constexpr):
    """Ω += α · Σ_s partial[s], summed in the fixed order s = 0, 1, … (Ω contiguous)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    part = part_ptr + offs
    for _ in range(0, n_split):
        acc += tl.load(part, mask=mask, other=0.0)
        part += numel  # pointer arithmetic: 64-bit
    omega = tl.load(omega_ptr + offs, mask=mask, other=0.0)
    tl.store(omega_ptr + offs, omega + alpha * acc, mask=mask)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4,
                                 num_stages=1)
#: Autotune key: Ω's shape, the bucketed sequence length, the variant (not the batch size).
KEY = ["n_out", "n_in", "seq_bucket", "ACCUM", "UPCAST", "TO_BF16", "PRECISION"]
KERNEL = TunedKernel(_per_sample_kernel, _GPU_CONFIGS, KEY, ["out_ptr"], "a_ptr", INTERPRET_CONFIG)


def choose_split(omega: torch.Tensor, batch: int) -> int:
    """How many sample ranges to run side by side (1: accumulate straight into Ω).

    Depends on the GPU's SM count, so results on GPUs with different SM counts may
    differ in the last bits (another summation order); on one GPU it is fixed.
    """
    if INTERPRET or omega.device.type != "cuda" or not omega.is_contiguous() or batch < 2:
        return 1
    out, inp = omega.shape
    tiles = triton.cdiv(out, GPU_TILE) * triton.cdiv(inp, GPU_TILE)
    sms = torch.cuda.get_device_properties(omega.device).multi_processor_count
    if tiles >= sms:  # at least one full wave already (one 128×128 program per SM fits at a time)
        return 1
    want = triton.cdiv(2 * sms, tiles)
    cap = PARTIAL_BYTES // max(1, out * inp * 4)
    split = min(want, batch, cap)
    return split if split >= 2 else 1


def per_sample_abs_acc_(omega, a, b, alpha: float, precision: str = "accurate", split: int | None = None) -> None:
    """``omega += alpha * Σ_b |a_bᵀ b_b|``; a ``[B, T, out]``, b ``[B, T, in]``, omega fp32 ``[out, in]``.

    ``split`` (``None``: :func:`choose_split`) splits the batch over a second grid
    axis with a partial buffer reduced in a fixed order (tests force it on CPU).
    """
    if a.dtype not in KERNEL_DTYPES or b.dtype not in KERNEL_DTYPES:
        notice_reference("per_sample_abs_acc_", f"{a.dtype}/{b.dtype} operands")
        reference.per_sample_abs_acc_(omega, a, b, alpha, precision)
        return
    if a.dtype != b.dtype:  # fp16 next to bf16, or 16-bit next to fp32: fp32 holds both exactly
        a, b = a.float(), b.float()
    if omega.dtype != torch.float32:
        raise TypeError(f"per_sample_abs_acc_ (triton): omega must be float32, got {omega.dtype}")
    nb, t, m = a.shape
    n = b.shape[2]
    if nb == 0 or t == 0 or omega.numel() == 0:
        return
    if precision == "fast":
        notice(("per_sample_abs_acc_", "fast"), "per_sample_abs_acc_ precision='fast' has no fp8 path: fp32 "
               "operands are rounded to bf16, 16-bit operands are used as given", level=logging.INFO)
    with on_device(omega.device):
        if split is None:
            split = choose_split(omega, nb)
        split = max(1, min(int(split), nb))
        if split > 1 and not omega.is_contiguous():
            raise ValueError("per_sample_abs_acc_ (triton): split > 1 needs a contiguous omega")
        per_split = triton.cdiv(nb, split)
        split = triton.cdiv(nb, per_split)  # no empty ranges
        to_bf16 = precision == "fast" and a.dtype == torch.float32
        if split == 1:
            target, accum, s_split, s_out, s_in = omega, True, 0, omega.stride(0), omega.stride(1)
        else:
            target = torch.empty((split, m, n), dtype=torch.float32, device=omega.device)
            accum, s_split, s_out, s_in = False, target.stride(0), target.stride(1), target.stride(2)
        args = (
            target, a, b, nb, t, size_bucket(t), m, n, per_split,
            a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
            s_split, s_out, s_in, float(alpha),
        )
        meta = dict(
            ACCUM=accum,
            UPCAST=INTERPRET and (a.dtype != torch.float32 or to_bf16),
            TO_BF16=to_bf16,
            PRECISION=dot_precision(a.dtype, precision),
        )
        grid = lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
        KERNEL(grid, args, meta, omega.device)
        if split > 1:
            block = 256 if INTERPRET else 1024
            numel = m * n
            _reduce_partials_kernel[(triton.cdiv(numel, block),)](
                omega, target, numel, split, float(alpha), BLOCK=block, num_warps=4
            )
