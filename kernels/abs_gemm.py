"""Triton abs-GEMM accumulate: ``Ω[out, in] += α · |A|ᵀ |B|`` (A ``[R, out]``, B ``[R, in]``, Ω fp32).

What ``backend="triton"`` runs (see ``docs/triton.md`` for the precision contract):

1. The abs pre-pass: one Triton launch writes ``|A|`` and ``|B|`` into a contiguous
   scratch (any input strides, both operands in one launch). For operands kept in
   their own dtype it clears the sign bit (exact); for ``precision="fast"`` without
   fp8 it rounds fp32 operands to bf16. R is processed in chunks so that the
   scratch stays below :data:`SCRATCH_BYTES`.
2. The GEMM on the non-negative copies, accumulating into Ω:
   * bf16/fp16 operands: cuBLAS. :func:`cublas_path` checks once per device and
     dtype which call accumulates 16-bit operands into an fp32 Ω correctly:
     ``addmm.dtype_out`` (Ω added in cuBLAS's epilogue, beta = 1), else
     ``mm(out_dtype=fp32)`` plus ``Ω.add_`` (one extra fp32 ``[out, in]`` round trip),
     else the Triton GEMM below; a fallback is logged as a warning, never silent.
   * fp32 operands: the Triton GEMM, ``input_precision="tf32"`` for ``"accurate"``
     and ``"ieee"`` for ``"exact"`` — chosen per launch, so no global TF32 flag of
     torch is read or written.
3. ``precision="fast"`` on GPUs with fp8 (compute capability ≥ 8.9): per R-chunk, a
   Triton amax pass and an e4m3 cast pass (:mod:`.fp8`), then ``torch._scaled_mm``
   (checked once per device) or the Triton GEMM on fp8 operands with the two scales.

Why a pre-pass and not ``tl.abs`` on the loaded tiles: the planning measurements
found that abs in registers costs 1.67× cuBLAS (the async-copy → tensor-core
pipeline is lost); the fused variant lives in ``bench/designs/`` for comparison.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from mas_local.ops import reference

from . import fp8
from .launch import (
    INTERPRET,
    KERNEL_DTYPES,
    TunedKernel,
    notice,
    notice_reference,
    on_device,
    refuse_capture,
    size_bucket,
)

log = logging.getLogger("mas_local")
#: Largest scratch for the abs copies (or fp8 copies) of one R-chunk (bytes).
SCRATCH_BYTES = 512 << 20

# --------------------------------------------------------------------------- kernels


@triton.jit
def grouped_tile(pid, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles share their B columns in L2."""
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(n_cols, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _gemm_kernel(
    omega_ptr,
    a_ptr,
    b_ptr,
    scale_a_ptr,
    scale_b_ptr,
    n_out,
    n_in,
    n_rows,
    rows_bucket,  # autotune key only (the bucketed n_rows)
    a_stride_row,
    a_stride_out,
    b_stride_row,
    b_stride_in,
    o_stride_out,
    o_stride_in,
    alpha,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Ω[o, i] += α · Σ_r A[r, o] B[r, i] for one [BLOCK_M, BLOCK_N] tile of Ω (A, B already non-negative)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), n_out, n_in, BLOCK_M, BLOCK_N, GROUP_M)
    ro = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    o_ok = ro < n_out
    i_ok = ri < n_in
    ro64 = ro.to(tl.int64)  # 64-bit offsets: a transposed view has strides up to R
    ri64 = ri.to(tl.int64)
    a_ptrs = a_ptr + ro64[:, None] * a_stride_out + rk.to(tl.int64)[None, :] * a_stride_row  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + rk.to(tl.int64)[:, None] * b_stride_row + ri64[None, :] * b_stride_in  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(n_rows, BLOCK_K)):
        k_ok = rk < n_rows - k * BLOCK_K
        a = tl.load(a_ptrs, mask=o_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & i_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * a_stride_row
        b_ptrs += BLOCK_K * b_stride_row
    if SCALED:
        acc = acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))
    o_ptrs = omega_ptr + ro64[:, None] * o_stride_out + ri64[None, :] * o_stride_in
    o_mask = o_ok[:, None] & i_ok[None, :]
    omega = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, omega + alpha * acc, mask=o_mask)


@triton.jit
def _abs_tile(src_ptr, dst_ptr, rows, cols, row_stride, col_stride, tile, SIGN_MASK: tl.constexpr,
              BITWISE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """dst[r, c] = |src[r, c]| (dst contiguous [rows, cols]): the sign bit cleared on int views
    (BITWISE, exact, NaN stays NaN), or through fp32 into dst's float dtype."""
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    r = (tile // tiles_c) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = (tile % tiles_c) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    r64 = r.to(tl.int64)
    src = src_ptr + r64[:, None] * row_stride + c.to(tl.int64)[None, :] * col_stride
    if BITWISE:
        x = tl.load(src, mask=mask, other=0)
        y = (x & SIGN_MASK).to(dst_ptr.dtype.element_ty)
    else:
        x = tl.load(src, mask=mask, other=0.0)
        y = tl.abs(x.to(tl.float32)).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + r64[:, None] * cols + c[None, :], y, mask=mask)


@triton.jit
def _abs_copy_kernel(
    a_ptr, da_ptr, a_rows, a_cols, a_row_stride, a_col_stride,
    b_ptr, db_ptr, b_rows, b_cols, b_row_stride, b_col_stride,
    tiles_a,
    SIGN_MASK: tl.constexpr, BITWISE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """Both operands' abs copies in one launch: the first tiles_a programs do A, the rest B."""
    pid = tl.program_id(0)
    if pid < tiles_a:
        _abs_tile(a_ptr, da_ptr, a_rows, a_cols, a_row_stride, a_col_stride, pid, SIGN_MASK, BITWISE,
                  BLOCK_ROWS, BLOCK_COLS)
    else:
        _abs_tile(b_ptr, db_ptr, b_rows, b_cols, b_row_stride, b_col_stride, pid - tiles_a, SIGN_MASK, BITWISE,
                  BLOCK_ROWS, BLOCK_COLS)


# --------------------------------------------------------------------------- launches

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
]
_GPU_FP8_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=4),
]
#: The one config under the interpreter (autotune cannot time there).
INTERPRET_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}, num_warps=4,
                                 num_stages=1)
#: Autotune key: Ω's shape, the bucketed number of rows, the variant.
GEMM_KEY = ["n_out", "n_in", "rows_bucket", "UPCAST", "SCALED", "PRECISION"]
GEMM = TunedKernel(_gemm_kernel, _GPU_CONFIGS, GEMM_KEY, ["omega_ptr"], "a_ptr", INTERPRET_CONFIG)
GEMM_FP8 = TunedKernel(_gemm_kernel, _GPU_FP8_CONFIGS, GEMM_KEY, ["omega_ptr"], "a_ptr", INTERPRET_CONFIG)
_COPY_BLOCK = (16, 16) if INTERPRET else (64, 128)


def dot_precision(dtype: torch.dtype, precision: str) -> str:
    """``tl.dot``'s ``input_precision`` for an operand dtype and a precision mode."""
    if INTERPRET or (dtype == torch.float32 and precision == "exact"):
        return "ieee"
    return "tf32"  # fp32 operands as TF32 ("accurate"); ignored for 16-bit operands


def launch_gemm(omega, a_t, b, alpha, dot: str, scales=None, fp8_configs: bool = False) -> None:
    """Ω += α·a_t @ b (times the two scales, if given) through the Triton GEMM; a_t ``[out, R]``, b ``[R, in]``."""
    n_out, n_rows = a_t.shape
    n_in = b.shape[1]
    sa, sb = scales if scales is not None else (omega, omega)  # unused pointers when not SCALED
    args = (
        omega, a_t, b, sa, sb, n_out, n_in, n_rows, size_bucket(n_rows),
        a_t.stride(1), a_t.stride(0), b.stride(0), b.stride(1), omega.stride(0), omega.stride(1), float(alpha),
    )
    meta = dict(UPCAST=INTERPRET and a_t.dtype != torch.float32, SCALED=scales is not None, PRECISION=dot)
    grid = lambda m: (triton.cdiv(n_out, m["BLOCK_M"]) * triton.cdiv(n_in, m["BLOCK_N"]),)
    (GEMM_FP8 if fp8_configs else GEMM)(grid, args, meta, omega.device)


def _int_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    if t.element_size() == 4:
        return t.view(torch.int32), 0x7FFFFFFF
    if t.element_size() == 2:
        return t.view(torch.int16), 0x7FFF
    raise TypeError(f"abs_gemm_acc_ (triton): unsupported operand dtype {t.dtype}")


def abs_copy(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None):
    """``(|a|, |b|)`` as contiguous tensors of ``dtype`` (default: the operands' own), from any 2-D strides.

    In the operands' own dtype the sign bit is cleared (exact); into another dtype
    each value goes through fp32 and is rounded once.
    """
    if a.dtype != b.dtype:
        raise TypeError("abs_copy: operands must share a dtype")
    dtype = dtype or a.dtype
    da = torch.empty(a.shape, dtype=dtype, device=a.device)
    db = torch.empty(b.shape, dtype=dtype, device=b.device)
    bitwise = dtype == a.dtype
    if bitwise:
        (sa, mask), (sb, _) = _int_view(a), _int_view(b)
        dsta, dstb = da.view(sa.dtype), db.view(sb.dtype)
    else:
        sa, sb, mask, dsta, dstb = a, b, 0, da, db
    br, bc = _COPY_BLOCK
    tiles_a = triton.cdiv(a.shape[0], br) * triton.cdiv(a.shape[1], bc)
    tiles_b = triton.cdiv(b.shape[0], br) * triton.cdiv(b.shape[1], bc)
    if tiles_a + tiles_b:
        _abs_copy_kernel[(tiles_a + tiles_b,)](
            sa, dsta, a.shape[0], a.shape[1], sa.stride(0), sa.stride(1),
            sb, dstb, b.shape[0], b.shape[1], sb.stride(0), sb.stride(1),
            tiles_a, SIGN_MASK=mask, BITWISE=bitwise, BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=4,
        )
    return da, db


def row_chunks(rows: int, bytes_per_row: int, limit: int | None = None) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges whose scratch (``bytes_per_row`` each) stays within ``limit``
    (:data:`SCRATCH_BYTES`); chunks are multiples of 256 rows (GEMM-friendly, fp8-padding-free)."""
    limit = SCRATCH_BYTES if limit is None else limit
    chunk = max(1, min(rows, limit // max(bytes_per_row, 1)))
    if rows > chunk:
        chunk = max(256, chunk // 256 * 256)
    return [(r0, min(rows, r0 + chunk)) for r0 in range(0, rows, chunk)]


# --------------------------------------------------------------------------- cuBLAS for 16-bit operands

_cublas_paths: dict[tuple, str] = {}
CUBLAS_PATHS = ("addmm.dtype_out", "mm.out_dtype", "triton")


def _addmm_dtype_out(omega, a_t, b, alpha) -> None:
    torch.ops.aten.addmm.dtype_out(omega, a_t, b, torch.float32, beta=1.0, alpha=alpha, out=omega)


def _mm_out_dtype_add(omega, a_t, b, alpha) -> None:
    omega.add_(torch.ops.aten.mm.dtype(a_t, b, torch.float32), alpha=alpha)


def cublas_path(device: torch.device, dtype: torch.dtype) -> str:
    """Which call accumulates 16-bit operands into an fp32 Ω on ``device``: one of :data:`CUBLAS_PATHS`.

    Checked once per (device, dtype) on a small problem against an exact result
    (this syncs, so the first call must not be inside a CUDA-graph capture). torch
    releases differ in what ``addmm.dtype_out`` accepts for an fp32 Ω next to bf16
    operands; a fallback is logged as a warning naming the reason.
    """
    key = (str(device), dtype)
    if key in _cublas_paths:
        return _cublas_paths[key]
    refuse_capture(device, "the first 16-bit abs-GEMM on this device",
                   "it checks once, with a host sync, which cuBLAS call accumulates into an fp32 Ω")
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.rand(40, 24, generator=g).to(dtype)
    b = torch.rand(40, 40, generator=g).to(dtype)
    omega = torch.rand(24, 40, generator=g)
    want = (omega.double() + 0.5 * a.double().t() @ b.double()).float()
    reasons = []
    path = "triton"
    for name, call in (("addmm.dtype_out", _addmm_dtype_out), ("mm.out_dtype", _mm_out_dtype_add)):
        try:
            got = omega.to(device)
            call(got, a.to(device).t(), b.to(device), 0.5)
            if torch.allclose(got.cpu(), want, rtol=1e-5, atol=1e-5):
                path = name
                break
            reasons.append(f"{name} gave a wrong result")
        except Exception as exc:  # noqa: BLE001 - absent or rejecting: try the next call
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    _cublas_paths[key] = path
    if path == "addmm.dtype_out":
        log.info("mas_local.kernels: abs-GEMM on %s %s accumulates in cuBLAS (addmm.dtype_out)", device, dtype)
    else:
        log.warning("mas_local.kernels: abs-GEMM on %s with %s operands uses %s (%s)", device, dtype,
                    "cuBLAS mm(out_dtype=fp32) + add" if path == "mm.out_dtype" else "the Triton GEMM",
                    "; ".join(reasons))
    return path


# --------------------------------------------------------------------------- entry point


def _accumulate(omega, aa, bb, alpha, precision) -> None:
    """Ω += α·aaᵀ bb for the non-negative pre-pass copies."""
    if aa.dtype != torch.float32 and omega.device.type == "cuda":
        path = cublas_path(omega.device, aa.dtype)
        if path == "addmm.dtype_out" and omega.is_contiguous():
            _addmm_dtype_out(omega, aa.t(), bb, alpha)
            return
        if path != "triton":
            _mm_out_dtype_add(omega, aa.t(), bb, alpha)
            return
    launch_gemm(omega, aa.t(), bb, alpha, dot_precision(aa.dtype, precision))


def _fast_fp8(omega, a, b, alpha) -> None:
    """precision="fast" with fp8: per R-chunk, e4m3 copies with per-chunk scales, then one scaled GEMM."""
    aligned = a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0  # cuBLAS fp8 wants multiples of 16
    use_cublas = aligned and fp8.scaled_mm_works(omega.device)
    for r0, r1 in row_chunks(a.shape[0], a.shape[1] + b.shape[1]):
        a8, b8, s_a, s_b = fp8.prepass(a[r0:r1], b[r0:r1])
        if use_cublas:
            omega.add_(fp8.scaled_mm(a8, b8, s_a, s_b), alpha=alpha)
        else:
            launch_gemm(omega, a8, b8.t(), alpha, "tf32", scales=(s_a, s_b), fp8_configs=True)


def fast_mode(device: torch.device) -> str:
    """What ``precision="fast"`` runs on ``device``: ``"fp8"`` or ``"bf16"`` (and why, in a notice)."""
    reason = fp8.unavailable_reason(device)
    if reason is None:
        return "fp8"
    notice(("abs_gemm_acc_", "fast", device.type), "abs_gemm_acc_ precision='fast': no fp8 here (%s); fp32 "
           "operands are rounded to bf16 instead, 16-bit operands are used as given", reason, level=logging.WARNING)
    return "bf16"


def abs_gemm_acc_(omega, a, b, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * |a|ᵀ |b|``; a ``[R, out]``, b ``[R, in]`` (any strides), omega fp32 ``[out, in]``."""
    if a.dtype not in KERNEL_DTYPES or b.dtype not in KERNEL_DTYPES:
        # float64 operands: the reference keeps `auto` working.
        notice_reference("abs_gemm_acc_", f"{a.dtype}/{b.dtype} operands")
        reference.abs_gemm_acc_(omega, a, b, alpha, precision)
        return
    if a.dtype != b.dtype:  # fp16 next to bf16, or 16-bit next to fp32: fp32 holds both exactly
        a, b = a.float(), b.float()
    if omega.dtype != torch.float32:
        raise TypeError(f"abs_gemm_acc_ (triton): omega must be float32, got {omega.dtype}")
    if a.shape[0] == 0 or omega.numel() == 0:
        return
    with on_device(omega.device):
        dtype = a.dtype
        if precision == "fast":
            if fast_mode(omega.device) == "fp8":
                _fast_fp8(omega, a, b, alpha)
                return
            dtype = torch.bfloat16 if dtype == torch.float32 else dtype
        per_row = (a.shape[1] + b.shape[1]) * torch.empty((), dtype=dtype).element_size()
        for r0, r1 in row_chunks(a.shape[0], per_row):
            aa, bb = abs_copy(a[r0:r1], b[r0:r1], dtype)
            _accumulate(omega, aa, bb, alpha, precision)
