"""Triton abs-GEMM accumulate: ``Ω[out, in] += α · |A|ᵀ |B|`` (A ``[R, out]``, B ``[R, in]``, Ω fp32).

Four designs live here; :func:`abs_gemm_acc_` picks one per call (``design="auto"``):

``"prepass"`` (default on CUDA)
    One Triton launch takes ``|A|`` and ``|B|`` into a contiguous scratch buffer in
    the operands' own dtype (the abs is a bit operation on the sign bit, so it is
    exact and costs one read and one write of the operands, ~0.13 ms for the
    N=16384, 4096×4096 bf16 case at 4.27 TB/s), then cuBLAS accumulates into Ω in
    its epilogue: ``addmm(Ω, |A|ᵀ, |B|, beta=1, alpha=α, out_dtype=fp32, out=Ω)``.
    Why: the planning measurements showed that ``tl.abs`` on the loaded tiles
    pulls the operands through registers and loses the async-copy → tensor-core
    pipeline (1.67× cuBLAS), while a GEMM on already non-negative operands keeps
    it. cuBLAS is the best GEMM on the machine, and the pre-pass is a pure
    streaming pass. The scratch is bounded: R is processed in chunks of at most
    :data:`SCRATCH_BYTES` (each chunk accumulates into Ω with beta=1). bf16/fp16
    go through ``aten::addmm.dtype_out`` (bf16 operands, fp32 Ω); it is checked
    once per process on a small problem and, if absent or wrong, the Triton GEMM
    of ``"prepass-triton"`` is used instead. fp32 operands use cuBLAS with TF32
    switched on ("accurate") or off ("exact") for the duration of the call only.
``"prepass-triton"``
    The same pre-pass followed by the Triton GEMM below without abs in its loop.
``"prepass-overlap"``
    The pre-pass in four R-pieces on a side stream, each piece's cuBLAS GEMM on the
    caller's stream as soon as its piece is ready: the memory-bound pre-pass can
    hide behind the compute-bound GEMM. A candidate for the ≤ 1.15× target, to be
    measured; falls back to ``"prepass"`` off CUDA and for small R.
``"fused"`` (the only design under ``TRITON_INTERPRET=1``)
    One Triton GEMM: abs on the loaded tiles, ``tl.dot``, Ω tile loaded, added
    and stored in the epilogue; no abs copy, no ``[out, in]`` temporary. Kept so
    that it can be measured against the others (``bench/gpu_table.py``).

``precision="fast"`` (fp8 e4m3, CUDA with compute capability ≥ 8.9): a Triton
pass computes amax(|A|) and amax(|B|) (atomic max on the bit pattern: exact and
order-independent, hence deterministic), a second Triton pass writes
``|x| · 448 / amax`` as e4m3 in K-major layout (``[out, R16]`` and ``[in, R16]``,
R padded with zeros to a multiple of 16), then ``torch._scaled_mm`` with the two
per-tensor scales (fp32 output, added to Ω) or, when that is unavailable, a
Triton fp8 ``tl.dot`` that accumulates into Ω in its epilogue. Elsewhere "fast"
falls back to "accurate".

Errors (all terms of the sum are non-negative, so the relative error of every
element of Ω is bounded by the relative error of one product, no cancellation):
"exact" fp32 ≈ 1e-6; "accurate" bf16/fp16 operands are used as given (fp32
accumulation, ≈ 1e-6 relative to the exact product of the given operands); fp32
operands in "accurate" are rounded to TF32 (≤ 2·2⁻¹¹ ≈ 1e-3 worst case, far less
on average); "fast" e4m3 rounds each operand to 3 mantissa bits (≤ 2·2⁻⁴ per
product worst case; random rounding averages out over R: ~2e-3 measured in
planning at R=16384; values below amax·2⁻¹⁵ become subnormal and lose bits,
below amax·2⁻¹⁹ they flush to zero).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from mas_local.ops import reference

log = logging.getLogger("mas_local")
#: Operand dtypes the kernels take; others (float64) run the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_noticed: set[tuple[str, str]] = set()


def _notice_reference(op: str, why: str) -> None:
    """Log once per (op, reason) that a call ran the torch reference instead of a kernel."""
    if (op, why) not in _noticed:
        _noticed.add((op, why))
        log.info("mas_local.kernels: %s runs the torch reference for %s", op, why)


def _interpreting() -> bool:
    """True when Triton itself (its standard library included) was set up for the interpreter.

    ``TRITON_INTERPRET=1`` only counts if it was set before ``triton`` was first
    imported; set later, the kernels here would be interpreted but Triton's own
    ``@jit`` helpers (``tl.cdiv``, …) not, and nothing could run on CPU tensors.
    """
    if not triton.knobs.runtime.interpret:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.cdiv, InterpretedFunction)


#: Kernels run under the Triton interpreter (CPU tensors); see :func:`_interpreting`.
INTERPRET = _interpreting()
#: TRITON_INTERPRET=1 was set only after triton had been imported (nothing runs on CPU then).
INTERPRET_TOO_LATE = bool(triton.knobs.runtime.interpret) and not INTERPRET
DESIGNS = ("auto", "fused", "prepass", "prepass-triton", "prepass-overlap")
#: Largest scratch for the abs copies of one R-chunk (bytes).
SCRATCH_BYTES = 512 << 20
E4M3_MAX = 448.0
#: ``MAS_LOCAL_TRITON_AUTOTUNE=0`` (read at import): the first config that fits, no tuning (quick test runs).
AUTOTUNE = os.environ.get("MAS_LOCAL_TRITON_AUTOTUNE", "1") != "0"

# --------------------------------------------------------------------------- kernels


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles share their B columns in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _abs_gemm_kernel(
    omega_ptr,
    a_ptr,
    b_ptr,
    scale_a_ptr,
    scale_b_ptr,
    M,
    N,
    K,
    s_ak,
    s_am,
    s_bk,
    s_bn,
    s_om,
    s_on,
    alpha,
    ABS: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Ω[m, n] += α · Σ_k |A[k, m]| |B[k, n]| for one [BLOCK_M, BLOCK_N] tile of Ω."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)  # 64-bit offsets: a transposed view has strides up to R
    rn64 = rn.to(tl.int64)
    a_ptrs = a_ptr + rm64[:, None] * s_am + rk[None, :] * s_ak  # [BLOCK_M, BLOCK_K] of Aᵀ
    b_ptrs = b_ptr + rk[:, None] * s_bk + rn64[None, :] * s_bn  # [BLOCK_K, BLOCK_N] of B
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 arithmetic is wrong: compute in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if ABS:
            a = tl.abs(a)
            b = tl.abs(b)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * s_ak
        b_ptrs += BLOCK_K * s_bk
    if SCALED:
        acc = acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))
    o_ptrs = omega_ptr + rm64[:, None] * s_om + rn64[None, :] * s_on
    o_mask = m_ok[:, None] & n_ok[None, :]
    omega = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, omega + alpha * acc, mask=o_mask)


@triton.jit
def _abs_tile(src_ptr, dst_ptr, rows, cols, s0, s1, tile, SIGN_MASK: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
    """dst[r, c] = src[r, c] with the sign bit cleared (int views; dst contiguous [rows, cols])."""
    tiles_c = tl.cdiv(cols, BC)
    r = (tile // tiles_c) * BR + tl.arange(0, BR)
    c = (tile % tiles_c) * BC + tl.arange(0, BC)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(src_ptr + r64[:, None] * s0 + c.to(tl.int64)[None, :] * s1, mask=mask, other=0)
    x = (x & SIGN_MASK).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + r64[:, None] * cols + c[None, :], x, mask=mask)


@triton.jit
def _abs_copy_kernel(
    a_ptr,
    da_ptr,
    a_rows,
    a_cols,
    a_s0,
    a_s1,
    b_ptr,
    db_ptr,
    b_rows,
    b_cols,
    b_s0,
    b_s1,
    tiles_a,
    SIGN_MASK: tl.constexpr,
    BR: tl.constexpr,
    BC: tl.constexpr,
):
    """Both operands' abs copies in one launch: the first tiles_a programs do A, the rest B."""
    pid = tl.program_id(0)
    if pid < tiles_a:
        _abs_tile(a_ptr, da_ptr, a_rows, a_cols, a_s0, a_s1, pid, SIGN_MASK, BR, BC)
    else:
        _abs_tile(b_ptr, db_ptr, b_rows, b_cols, b_s0, b_s1, pid - tiles_a, SIGN_MASK, BR, BC)


@triton.jit
def _amax_tile(src_ptr, rows, cols, s0, s1, tile, amax_ptr, BR: tl.constexpr, BC: tl.constexpr):
    tiles_c = tl.cdiv(cols, BC)
    r = (tile // tiles_c) * BR + tl.arange(0, BR)
    c = (tile % tiles_c) * BC + tl.arange(0, BC)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(src_ptr + r.to(tl.int64)[:, None] * s0 + c.to(tl.int64)[None, :] * s1, mask=mask, other=0.0)
    m = tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0)
    # Non-negative floats order like their bit patterns: an integer atomic max is exact.
    tl.atomic_max(amax_ptr, m.to(tl.int32, bitcast=True))


@triton.jit
def _amax_kernel(
    a_ptr, a_rows, a_cols, a_s0, a_s1, b_ptr, b_rows, b_cols, b_s0, b_s1, tiles_a, amax_ptr,
    BR: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < tiles_a:
        _amax_tile(a_ptr, a_rows, a_cols, a_s0, a_s1, pid, amax_ptr, BR, BC)
    else:
        _amax_tile(b_ptr, b_rows, b_cols, b_s0, b_s1, pid - tiles_a, amax_ptr + 1, BR, BC)


@triton.jit
def _fp8_tile(src_ptr, dst_ptr, rows, rows_pad, cols, s0, s1, tile, amax_ptr, scale_ptr,
              BR: tl.constexpr, BC: tl.constexpr):
    """dst[c, r] = e4m3(|src[r, c]| · 448 / amax) for r < rows_pad (zeros past rows): K-major."""
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    amax = tl.where(amax > 0, amax, 1.0)
    tiles_c = tl.cdiv(cols, BC)
    r = (tile // tiles_c) * BR + tl.arange(0, BR)
    c = (tile % tiles_c) * BC + tl.arange(0, BC)
    load_mask = (r < rows)[:, None] & (c < cols)[None, :]
    x = tl.load(src_ptr + r.to(tl.int64)[:, None] * s0 + c.to(tl.int64)[None, :] * s1, mask=load_mask, other=0.0)
    q = tl.minimum(tl.abs(x.to(tl.float32)) * (448.0 / amax), 448.0).to(tl.float8e4nv)
    store_mask = (r < rows_pad)[:, None] & (c < cols)[None, :]
    tl.store(dst_ptr + c.to(tl.int64)[None, :] * rows_pad + r[:, None], q, mask=store_mask)
    if tile == 0:
        tl.store(scale_ptr, amax / 448.0)


@triton.jit
def _fp8_cast_kernel(
    a_ptr, da_ptr, a_cols, a_s0, a_s1, b_ptr, db_ptr, b_cols, b_s0, b_s1, rows, rows_pad, tiles_a,
    amax_ptr, scale_ptr, BR: tl.constexpr, BC: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < tiles_a:
        _fp8_tile(a_ptr, da_ptr, rows, rows_pad, a_cols, a_s0, a_s1, pid, amax_ptr, scale_ptr, BR, BC)
    else:
        _fp8_tile(b_ptr, db_ptr, rows, rows_pad, b_cols, b_s0, b_s1, pid - tiles_a, amax_ptr + 1, scale_ptr + 1, BR, BC)


# --------------------------------------------------------------------------- configs

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
#: Tile sizes used under the interpreter (one fixed config: autotune cannot time there).
INTERPRET_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 4}

#: Shared memory a config may plan for (H100/H200 allow 227 KiB per block; margin for the epilogue).
SMEM_LIMIT = 220 * 1024


def fitting_configs(configs, elem_size: int):
    """The configs whose operand stages fit in :data:`SMEM_LIMIT` for this operand size
    (all of them when autotuning, else the first); never empty."""
    def footprint(c):
        k = c.kwargs
        return c.num_stages * (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * elem_size

    fit = [c for c in configs if footprint(c) <= SMEM_LIMIT] or [min(configs, key=footprint)]
    return fit if AUTOTUNE else fit[:1]


def _prune(configs, named_args, **kwargs):
    return fitting_configs(configs, named_args["a_ptr"].element_size())


if INTERPRET:
    _gemm = _abs_gemm_kernel
    _gemm_fp8 = _abs_gemm_kernel
else:
    _key = ["M", "N", "K", "ABS", "UPCAST", "SCALED", "PRECISION"]
    _tune = dict(key=_key, restore_value=["omega_ptr"], prune_configs_by={"early_config_prune": _prune})
    # The kernel accumulates into Ω in place: every timed trial must start from the same Ω (restore_value).
    _gemm = triton.autotune(configs=_GPU_CONFIGS, **_tune)(_abs_gemm_kernel)
    _gemm_fp8 = triton.autotune(configs=_GPU_FP8_CONFIGS, **_tune)(_abs_gemm_kernel)

_COPY_BLOCK = (16, 16) if INTERPRET else (64, 128)


def _launch_gemm(omega, a_t, b, alpha, *, abs_in_loop, precision, s_a=None, s_b=None, fp8=False):
    """Ω += α·a_t @ b through the Triton GEMM; a_t is a ``[M, K]`` view, b a ``[K, N]`` view."""
    M, K = a_t.shape
    N = b.shape[1]
    upcast = INTERPRET and a_t.dtype != torch.float32
    scaled = s_a is not None
    if scaled:
        sa, sb = s_a, s_b
    else:
        sa = sb = omega  # unused pointer arguments
    args = (
        omega, a_t, b, sa, sb, M, N, K,
        a_t.stride(1), a_t.stride(0), b.stride(0), b.stride(1), omega.stride(0), omega.stride(1), float(alpha),
    )
    meta = dict(ABS=abs_in_loop, UPCAST=upcast, SCALED=scaled, PRECISION=precision)
    if INTERPRET:
        grid = (triton.cdiv(M, INTERPRET_BLOCKS["BLOCK_M"]) * triton.cdiv(N, INTERPRET_BLOCKS["BLOCK_N"]),)
        _abs_gemm_kernel[grid](*args, **meta, **INTERPRET_BLOCKS)
        return
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
    (_gemm_fp8 if fp8 else _gemm)[grid](*args, **meta)


# --------------------------------------------------------------------------- pre-passes


def _int_view(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    if t.element_size() == 4:
        return t.view(torch.int32), 0x7FFFFFFF
    if t.element_size() == 2:
        return t.view(torch.int16), 0x7FFF
    raise TypeError(f"abs_gemm_acc_ (triton): unsupported operand dtype {t.dtype}")


def abs_copy(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(|a|, |b|)`` as contiguous tensors of the same dtypes, from any 2-D strides, in one launch."""
    if a.dtype != b.dtype:
        raise TypeError("abs_copy: operands must share a dtype")
    da = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    db = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    ia, mask = _int_view(a)
    ib, _ = _int_view(b)
    br, bc = _COPY_BLOCK
    tiles_a = triton.cdiv(a.shape[0], br) * triton.cdiv(a.shape[1], bc)
    tiles_b = triton.cdiv(b.shape[0], br) * triton.cdiv(b.shape[1], bc)
    if tiles_a + tiles_b:
        _abs_copy_kernel[(tiles_a + tiles_b,)](
            ia, da.view(ia.dtype), a.shape[0], a.shape[1], ia.stride(0), ia.stride(1),
            ib, db.view(ib.dtype), b.shape[0], b.shape[1], ib.stride(0), ib.stride(1),
            tiles_a, SIGN_MASK=mask, BR=br, BC=bc, num_warps=4,
        )
    return da, db


def fp8_prepass(a: torch.Tensor, b: torch.Tensor):
    """e4m3 copies of |a|, |b| in K-major layout (``[out, R16]``, ``[in, R16]``) and their fp32 scales."""
    rows = a.shape[0]
    rows_pad = max(16, triton.cdiv(rows, 16) * 16)
    dev = a.device
    amax = torch.zeros(2, dtype=torch.int32, device=dev)
    scales = torch.empty(2, dtype=torch.float32, device=dev)
    a8 = torch.empty((a.shape[1], rows_pad), dtype=torch.float8_e4m3fn, device=dev)
    b8 = torch.empty((b.shape[1], rows_pad), dtype=torch.float8_e4m3fn, device=dev)
    br, bc = 64, 64
    tiles_a = triton.cdiv(rows, br) * triton.cdiv(a.shape[1], bc)
    tiles_b = triton.cdiv(rows, br) * triton.cdiv(b.shape[1], bc)
    _amax_kernel[(tiles_a + tiles_b,)](
        a, rows, a.shape[1], a.stride(0), a.stride(1), b, rows, b.shape[1], b.stride(0), b.stride(1),
        tiles_a, amax, BR=br, BC=bc, num_warps=4,
    )
    ptiles_a = triton.cdiv(rows_pad, br) * triton.cdiv(a.shape[1], bc)
    ptiles_b = triton.cdiv(rows_pad, br) * triton.cdiv(b.shape[1], bc)
    _fp8_cast_kernel[(ptiles_a + ptiles_b,)](
        a, a8, a.shape[1], a.stride(0), a.stride(1), b, b8, b.shape[1], b.stride(0), b.stride(1),
        rows, rows_pad, ptiles_a, amax, scales, BR=br, BC=bc, num_warps=4,
    )
    return a8, b8, scales[0:1], scales[1:2]


# --------------------------------------------------------------------------- cuBLAS pieces

_dtype_out_ok: dict[str, bool] = {}
_scaled_mm_ok: dict[str, bool] = {}


class _cublas_tf32:
    """Context: TF32 in cuBLAS on (``allow=True``) or off, restoring the caller's setting."""

    def __init__(self, allow: bool):
        self.allow = allow

    def __enter__(self):
        self.prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.allow

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.prev


def _addmm_dtype_out(omega, a_t, b, alpha) -> None:
    torch.ops.aten.addmm.dtype_out(omega, a_t, b, torch.float32, beta=1.0, alpha=alpha, out=omega)


def _dtype_out_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Checks once that ``addmm.dtype_out`` accumulates 16-bit operands into an fp32 Ω correctly."""
    key = f"{device.type}:{dtype}"
    if key not in _dtype_out_ok:
        ok = False
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            a = torch.rand(40, 24, generator=g).to(device=device, dtype=dtype)
            b = torch.rand(40, 40, generator=g).to(device=device, dtype=dtype)
            omega = torch.rand(24, 40, generator=g).to(device)
            want = omega.cpu() + 0.5 * a.cpu().float().t() @ b.cpu().float()  # exact fp32, whatever TF32 says
            _addmm_dtype_out(omega, a.t(), b, 0.5)
            ok = bool(torch.allclose(omega.cpu(), want, rtol=1e-4, atol=1e-4))
        except Exception as exc:  # noqa: BLE001 - absent or broken: the Triton GEMM takes over
            log.info("mas_local.kernels: addmm.dtype_out unusable on %s (%s)", key, exc)
        if not ok:
            log.info("mas_local.kernels: abs-GEMM uses the Triton GEMM after the pre-pass on %s", key)
        _dtype_out_ok[key] = ok
    return _dtype_out_ok[key]


# --------------------------------------------------------------------------- entry point


def _fp8_capable(device: torch.device) -> bool:
    if INTERPRET or device.type != "cuda" or not hasattr(torch, "float8_e4m3fn"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _gemm_nonneg(omega, aa, bb, alpha, precision, use_cublas) -> None:
    """Ω += α·aaᵀ bb for operands that are already non-negative (the pre-pass output)."""
    if use_cublas and not omega.is_contiguous():
        use_cublas = False  # cuBLAS writes a contiguous Ω; keep strided Ω on the Triton GEMM
    if use_cublas and aa.dtype == torch.float32:
        with _cublas_tf32(precision == "accurate"):
            omega.addmm_(aa.t(), bb, alpha=alpha)
    elif use_cublas and _dtype_out_works(omega.device, aa.dtype):
        _addmm_dtype_out(omega, aa.t(), bb, alpha)
    else:
        _launch_gemm(omega, aa.t(), bb, alpha, abs_in_loop=False, precision=_dot_precision(aa.dtype, precision))


def _prepass(omega, a, b, alpha, precision, use_cublas):
    rows = a.shape[0]
    per_row = (a.shape[1] + b.shape[1]) * a.element_size()
    chunk = max(1, min(rows, SCRATCH_BYTES // max(per_row, 1)))
    if rows > chunk:  # keep GEMM-friendly chunk lengths
        chunk = max(256, chunk // 256 * 256)
    for r0 in range(0, rows, chunk):
        aa, bb = abs_copy(a[r0 : r0 + chunk], b[r0 : r0 + chunk])
        _gemm_nonneg(omega, aa, bb, alpha, precision, use_cublas)


_side_streams: dict = {}
#: Pieces of R in the "prepass-overlap" design.
OVERLAP_PIECES = 4


def _prepass_overlap(omega, a, b, alpha, precision):
    """The pre-pass of R-piece i+1 runs on a side stream while cuBLAS works on piece i.

    The pre-pass is memory-bound and the GEMM compute-bound, so they can share the
    GPU; only the first piece's pre-pass is exposed (if the GEMM leaves room for
    the pre-pass blocks: measured by bench/gpu_table.py). Each piece's GEMM reads
    and writes Ω once (beta=1). Scratch: the abs copies of all of A and B.
    """
    rows = a.shape[0]
    per_row = (a.shape[1] + b.shape[1]) * a.element_size()
    if omega.device.type != "cuda" or rows < 2 * 256 or rows * per_row > 2 * SCRATCH_BYTES:
        _prepass(omega, a, b, alpha, precision, use_cublas=True)
        return
    step = triton.cdiv(triton.cdiv(rows, OVERLAP_PIECES), 256) * 256
    main = torch.cuda.current_stream(omega.device)
    side = _side_streams.get(omega.device)
    if side is None:
        side = _side_streams[omega.device] = torch.cuda.Stream(omega.device)
    side.wait_stream(main)  # the operands are written on the main stream
    pieces = []
    with torch.cuda.stream(side):
        for r0 in range(0, rows, step):
            aa, bb = abs_copy(a[r0 : r0 + step], b[r0 : r0 + step])
            done = torch.cuda.Event()
            done.record(side)
            pieces.append((aa, bb, done))
    for aa, bb, done in pieces:
        main.wait_event(done)
        aa.record_stream(main)  # allocated on the side stream, used on the main one
        bb.record_stream(main)
        _gemm_nonneg(omega, aa, bb, alpha, precision, use_cublas=True)


def _dot_precision(dtype: torch.dtype, precision: str) -> str:
    if INTERPRET or (dtype == torch.float32 and precision == "exact"):
        return "ieee"
    return "tf32"  # TF32 for fp32 operands; ignored for 16-bit operands


def _fast(omega, a, b, alpha) -> None:
    a8, b8, s_a, s_b = fp8_prepass(a, b)
    key = str(omega.device)
    aligned = a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0  # cuBLAS fp8 wants multiples of 16
    if aligned and _scaled_mm_ok.get(key, True) and hasattr(torch, "_scaled_mm"):
        try:
            prod = torch._scaled_mm(a8, b8.t(), s_a.reshape(()), s_b.reshape(()), out_dtype=torch.float32)
            omega.add_(prod, alpha=alpha)
            _scaled_mm_ok[key] = True
            return
        except Exception as exc:  # noqa: BLE001 - any failure of the private op: use the Triton fp8 GEMM
            if key not in _scaled_mm_ok:
                log.info("mas_local.kernels: torch._scaled_mm unusable (%s); using the Triton fp8 GEMM", exc)
            _scaled_mm_ok[key] = False
    _launch_gemm(omega, a8, b8.t(), alpha, abs_in_loop=False, precision="tf32", s_a=s_a, s_b=s_b, fp8=True)


def abs_gemm_acc_(omega, a, b, alpha: float, precision: str = "accurate", design: str | None = None) -> None:
    """``omega += alpha * |a|ᵀ |b|``; a ``[R, out]``, b ``[R, in]`` (any strides), omega fp32 ``[out, in]``.

    ``design`` (``None``: the environment variable ``MAS_LOCAL_TRITON_ABS_GEMM``, else
    ``"auto"``) chooses among :data:`DESIGNS`; see the module docstring.
    """
    if a.dtype not in KERNEL_DTYPES or b.dtype not in KERNEL_DTYPES:
        # float64 operands: the reference (fp32 math, like every backend's Ω) keeps `auto` working.
        _notice_reference("abs_gemm_acc_", f"{a.dtype}/{b.dtype} operands")
        reference.abs_gemm_acc_(omega, a, b, alpha, precision)
        return
    if a.dtype != b.dtype:
        common = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(common), b.to(common)
    if omega.dtype != torch.float32:
        raise TypeError(f"abs_gemm_acc_ (triton): omega must be float32, got {omega.dtype}")
    if a.shape[0] == 0 or omega.numel() == 0:
        return
    design = design or os.environ.get("MAS_LOCAL_TRITON_ABS_GEMM", "auto")
    if design not in DESIGNS:
        raise ValueError(f"abs_gemm_acc_ (triton): design must be one of {DESIGNS}, got {design!r}")
    if precision == "fast":
        if _fp8_capable(omega.device):
            _fast(omega, a, b, alpha)
            return
        precision = "accurate"
    if design == "auto":
        design = "fused" if INTERPRET or omega.device.type != "cuda" else "prepass"
    if design == "fused":
        _launch_gemm(omega, a.t(), b, alpha, abs_in_loop=True, precision=_dot_precision(a.dtype, precision))
    elif design == "prepass-overlap":
        _prepass_overlap(omega, a, b, alpha, precision)
    else:
        _prepass(omega, a, b, alpha, precision, use_cublas=design == "prepass")
