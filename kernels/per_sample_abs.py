"""Triton per-sample abs accumulate: ``Ω[out, in] += α · Σ_b |A_bᵀ B_b|`` (A ``[B, T, out]``, B ``[B, T, in]``).

Design: one program owns a ``[BLOCK_M, BLOCK_N]`` tile of Ω and keeps the running
``Σ_b |·|`` of that tile in registers. For each sample b it runs the T-reduction
``A_bᵀ B_b`` for the tile with ``tl.dot`` (fp32 accumulator), takes abs and adds
it to the running sum; after the last sample it loads the Ω tile, adds α times
the sum and stores it once. The ``[B, out, in]`` per-sample tensor never exists.

Loop structure (``loop=``): ``"flat"`` (default) runs one loop over all (sample,
k-step) pairs, so the loads keep streaming across sample boundaries and the
``|·|`` is added at each sample's last k-step; ``"nested"`` restarts the
T-reduction loop per sample (its software pipeline drains and refills every
sample: with T=512 and 64-deep k-steps only 8 steps per sample — the simple kernel
of the planning notes, 3.1× naive). Both are kept to be measured side by side.

Occupancy: with 128×128 tiles a 2048×2048 Ω has 256 tiles, ~two full waves on a
132-SM H200, which is enough. When the tiles are fewer than the SMs (a small Ω
would leave most of the GPU idle while it loops over b) the batch is split
over a second grid axis into ``split`` contiguous ranges of samples; each range
writes its tile sum to its own slice of an fp32 partial buffer ``[split, out,
in]`` (no atomics), and a second kernel adds ``α · Σ_s partial[s]`` to Ω in the
fixed order s = 0, 1, … — the result is deterministic and bit-identical between
runs. The buffer is capped at :data:`PARTIAL_BYTES` (64 MiB, the memory target),
which caps ``split``.

Operands: fp32 (TF32 tensor cores on the GPU, ``input_precision="tf32"``: ≈1e-3
relative per product; exact IEEE fp32 under the interpreter), fp16 and bf16
(tensor cores, fp32 accumulation; upcast to fp32 right after the load under the
interpreter, whose bf16 arithmetic is wrong). Any strides.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mas_local.ops import reference

from .abs_gemm import INTERPRET, KERNEL_DTYPES, _notice_reference, _prune, grouped_tile

#: Upper bound of the partial buffer of a split batch (bytes).
PARTIAL_BYTES = 64 << 20
#: ``tl.dot`` precision for fp32 operands on the GPU.
FP32_DOT_PRECISION = "tf32"
#: Tile sizes under the interpreter (one fixed config).
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}
GPU_TILE = 128
LOOPS = ("flat", "nested")


@triton.jit
def _per_sample_kernel(
    out_ptr,
    a_ptr,
    b_ptr,
    NB,
    T,
    M,
    N,
    per_split,
    s_ab,
    s_at,
    s_am,
    s_bb,
    s_bt,
    s_bn,
    s_os,
    s_om,
    s_on,
    alpha,
    ACCUM: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    FLAT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_tile = rm64[:, None] * s_am + rk[None, :] * s_at  # [BLOCK_M, BLOCK_K] of A_bᵀ
    b_tile = rk[:, None] * s_bt + rn64[None, :] * s_bn  # [BLOCK_K, BLOCK_N] of B_b
    b_lo = split * per_split
    b_hi = tl.minimum(b_lo + per_split, NB)
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    first = b_lo.to(tl.int64)  # 64-bit sample offsets: B·T·out may pass 2³¹
    if FLAT:
        # One loop over (sample, k-step) pairs: the load pipeline runs on across samples,
        # and at the last k-step of a sample its |A_bᵀB_b| tile is added to the total.
        n_k = tl.cdiv(T, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for it in range(0, (b_hi - b_lo) * n_k):
            sample = first + it // n_k
            k0 = (it % n_k) * BLOCK_K
            k_ok = rk < T - k0
            a_ptrs = a_ptr + sample * s_ab + k0 * s_at + a_tile
            b_ptrs = b_ptr + sample * s_bb + k0 * s_bt + b_tile
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if it % n_k == n_k - 1:
                total += tl.abs(acc)
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        # Nested loops: per sample, a fresh T-reduction (the pipeline refills per sample).
        a_sample = a_ptr + first * s_ab
        b_sample = b_ptr + first * s_bb
        for _ in range(b_lo, b_hi):
            a_ptrs = a_sample + a_tile
            b_ptrs = b_sample + b_tile
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(T, BLOCK_K)):
                k_ok = rk < T - k * BLOCK_K
                a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * s_at
                b_ptrs += BLOCK_K * s_bt
            total += tl.abs(acc)
            a_sample += s_ab
            b_sample += s_bb
    mask = m_ok[:, None] & n_ok[None, :]
    o_ptrs = out_ptr + split.to(tl.int64) * s_os + rm64[:, None] * s_om + rn64[None, :] * s_on
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
    for s in range(0, n_split):
        acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0.0)
    omega = tl.load(omega_ptr + offs, mask=mask, other=0.0)
    tl.store(omega_ptr + offs, omega + alpha * acc, mask=mask)


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": GPU_TILE, "BLOCK_N": GPU_TILE, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
if INTERPRET:
    _kernel = _per_sample_kernel
else:
    # In-place accumulation (ACCUM) is restored between timed trials.
    _kernel = triton.autotune(
        configs=_GPU_CONFIGS,
        key=["M", "N", "T", "ACCUM", "UPCAST", "PRECISION", "FLAT"],
        restore_value=["out_ptr"],
        prune_configs_by={"early_config_prune": _prune},  # shared-memory fit; one config without AUTOTUNE
    )(_per_sample_kernel)


def choose_split(omega: torch.Tensor, batch: int) -> int:
    """How many sample ranges to run side by side (1: accumulate straight into Ω)."""
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


def per_sample_abs_acc_(omega, a, b, alpha: float, split: int | None = None, loop: str | None = None) -> None:
    """``omega += alpha * Σ_b |a_bᵀ b_b|``; a ``[B, T, out]``, b ``[B, T, in]``, omega fp32 ``[out, in]``.

    ``split`` (``None``: chosen by :func:`choose_split`) splits the batch over a
    second grid axis with a deterministic partial buffer; ``loop`` (``None``: the
    environment variable ``MAS_LOCAL_TRITON_PER_SAMPLE``, else ``"flat"``) picks the
    loop structure; see the module docstring.
    """
    if a.dtype not in KERNEL_DTYPES or b.dtype not in KERNEL_DTYPES:
        _notice_reference("per_sample_abs_acc_", f"{a.dtype}/{b.dtype} operands")
        reference.per_sample_abs_acc_(omega, a, b, alpha)
        return
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    if omega.dtype != torch.float32:
        raise TypeError(f"per_sample_abs_acc_ (triton): omega must be float32, got {omega.dtype}")
    nb, t, m = a.shape
    n = b.shape[2]
    if nb == 0 or t == 0 or omega.numel() == 0:
        return
    if split is None:
        split = choose_split(omega, nb)
    split = max(1, min(int(split), nb))
    if split > 1 and not omega.is_contiguous():
        raise ValueError("per_sample_abs_acc_ (triton): split > 1 needs a contiguous omega")
    per_split = triton.cdiv(nb, split)
    split = triton.cdiv(nb, per_split)  # no empty ranges
    upcast = INTERPRET and a.dtype != torch.float32
    if INTERPRET or a.dtype != torch.float32:
        precision = "ieee" if INTERPRET else "tf32"
    else:
        precision = FP32_DOT_PRECISION
    if split == 1:
        target, accum, s_os = omega, True, 0
    else:
        target = torch.empty((split, m, n), dtype=torch.float32, device=omega.device)
        accum, s_os = False, target.stride(0)
    s_om, s_on = (omega.stride(0), omega.stride(1)) if split == 1 else (target.stride(1), target.stride(2))
    args = (
        target, a, b, nb, t, m, n, per_split,
        a.stride(0), a.stride(1), a.stride(2), b.stride(0), b.stride(1), b.stride(2),
        s_os, s_om, s_on, float(alpha),
    )
    loop = loop or os.environ.get("MAS_LOCAL_TRITON_PER_SAMPLE", "flat")
    if loop not in LOOPS:
        raise ValueError(f"per_sample_abs_acc_ (triton): loop must be one of {LOOPS}, got {loop!r}")
    meta = dict(ACCUM=accum, UPCAST=upcast, PRECISION=precision, FLAT=loop == "flat")
    if INTERPRET:
        grid = (triton.cdiv(m, INTERPRET_BLOCKS["BLOCK_M"]) * triton.cdiv(n, INTERPRET_BLOCKS["BLOCK_N"]), split)
        _per_sample_kernel[grid](*args, **meta, **INTERPRET_BLOCKS)
    else:
        grid = lambda meta_: (triton.cdiv(m, meta_["BLOCK_M"]) * triton.cdiv(n, meta_["BLOCK_N"]), split)
        _kernel[grid](*args, **meta)
    if split > 1:
        block = 256 if INTERPRET else 1024
        numel = m * n
        _reduce_partials_kernel[(triton.cdiv(numel, block),)](
            omega, target, numel, split, float(alpha), BLOCK=block, num_warps=4
        )
