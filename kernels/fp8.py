"""The fp8 pieces of the abs-GEMM's ``precision="fast"`` (GPUs with compute capability ≥ 8.9).

:func:`prepass` turns one R-chunk of A and B into e4m3 copies of ``|x| · 448 / amax``
in K-major layout (``[out, R16]`` and ``[in, R16]``, R zero-padded to a multiple of
16) with their fp32 scales ``amax / 448``, in two Triton launches:

* amax: each tile's ``max |x|`` is taken on the *bit patterns* of ``|x|`` as int32
  (non-negative floats order like their bits), then an integer atomic max; exact and
  order-independent, and a NaN (whose bits exceed +inf's) wins, so a NaN operand
  gives a NaN scale and a NaN Ω instead of a finite wrong one;
* cast: ``e4m3(min(|x| · 448 / amax, 448))`` with a clamp written so that NaN passes.

:func:`scaled_mm` is ``torch._scaled_mm`` with fp32 output; :func:`scaled_mm_works`
checks once per device, outside any CUDA-graph capture, that it gives the right
result (else the Triton GEMM on the fp8 copies is used).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, refuse_capture

log = logging.getLogger("mas_local")
E4M3_MAX = 448.0


@triton.jit
def _amax_tile(src_ptr, rows, cols, row_stride, col_stride, tile, amax_ptr, BLOCK_ROWS: tl.constexpr,
               BLOCK_COLS: tl.constexpr):
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    r = (tile // tiles_c) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = (tile % tiles_c) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    src = src_ptr + r.to(tl.int64)[:, None] * row_stride + c.to(tl.int64)[None, :] * col_stride
    x = tl.load(src, mask=mask, other=0.0)
    bits = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True)  # NaN bits > +inf bits > every finite
    tl.atomic_max(amax_ptr, tl.max(tl.max(bits, axis=1), axis=0))


@triton.jit
def _amax_kernel(
    a_ptr, a_rows, a_cols, a_row_stride, a_col_stride, b_ptr, b_rows, b_cols, b_row_stride, b_col_stride,
    tiles_a, amax_ptr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < tiles_a:
        _amax_tile(a_ptr, a_rows, a_cols, a_row_stride, a_col_stride, pid, amax_ptr, BLOCK_ROWS, BLOCK_COLS)
    else:
        _amax_tile(b_ptr, b_rows, b_cols, b_row_stride, b_col_stride, pid - tiles_a, amax_ptr + 1, BLOCK_ROWS,
                   BLOCK_COLS)


@triton.jit
def _cast_tile(src_ptr, dst_ptr, rows, rows_pad, cols, row_stride, col_stride, tile, amax_ptr, scale_ptr,
               BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """dst[c, r] = e4m3(|src[r, c]| · 448 / amax) for r < rows_pad (zeros past rows): K-major."""
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    amax = tl.where(amax == 0.0, 1.0, amax)  # all zeros: any scale; a NaN amax stays NaN
    tiles_c = tl.cdiv(cols, BLOCK_COLS)
    r = (tile // tiles_c) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    c = (tile % tiles_c) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    load_mask = (r < rows)[:, None] & (c < cols)[None, :]
    src = src_ptr + r.to(tl.int64)[:, None] * row_stride + c.to(tl.int64)[None, :] * col_stride
    x = tl.load(src, mask=load_mask, other=0.0)
    scaled = tl.abs(x.to(tl.float32)) * (448.0 / amax)
    q = tl.where(scaled > 448.0, 448.0, scaled).to(tl.float8e4nv)  # a comparison with NaN is false: NaN passes
    store_mask = (r < rows_pad)[:, None] & (c < cols)[None, :]
    tl.store(dst_ptr + c.to(tl.int64)[None, :] * rows_pad + r[:, None], q, mask=store_mask)
    if tile == 0:
        tl.store(scale_ptr, amax / 448.0)


@triton.jit
def _cast_kernel(
    a_ptr, da_ptr, a_cols, a_row_stride, a_col_stride, b_ptr, db_ptr, b_cols, b_row_stride, b_col_stride,
    rows, rows_pad, tiles_a, amax_ptr, scale_ptr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid < tiles_a:
        _cast_tile(a_ptr, da_ptr, rows, rows_pad, a_cols, a_row_stride, a_col_stride, pid, amax_ptr, scale_ptr,
                   BLOCK_ROWS, BLOCK_COLS)
    else:
        _cast_tile(b_ptr, db_ptr, rows, rows_pad, b_cols, b_row_stride, b_col_stride, pid - tiles_a, amax_ptr + 1,
                   scale_ptr + 1, BLOCK_ROWS, BLOCK_COLS)


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` if the fp8 path can run on ``device``, else why not."""
    if INTERPRET:
        return "the Triton interpreter has no fp8 tensor cores"
    if device.type != "cuda":
        return f"device type {device.type!r}"
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        return f"compute capability {cc[0]}.{cc[1]} < 8.9"
    return None


def prepass(a: torch.Tensor, b: torch.Tensor):
    """e4m3 copies of |a|, |b| in K-major layout (``[out, R16]``, ``[in, R16]``) and their fp32 scales."""
    rows = a.shape[0]
    rows_pad = max(16, triton.cdiv(rows, 16) * 16)
    dev = a.device
    amax = torch.zeros(2, dtype=torch.int32, device=dev)
    scales = torch.empty(2, dtype=torch.float32, device=dev)
    a8 = torch.empty((a.shape[1], rows_pad), dtype=torch.float8_e4m3fn, device=dev)
    b8 = torch.empty((b.shape[1], rows_pad), dtype=torch.float8_e4m3fn, device=dev)
    br, bc = (16, 16) if INTERPRET else (64, 64)
    tiles_a = triton.cdiv(rows, br) * triton.cdiv(a.shape[1], bc)
    tiles_b = triton.cdiv(rows, br) * triton.cdiv(b.shape[1], bc)
    _amax_kernel[(tiles_a + tiles_b,)](
        a, rows, a.shape[1], a.stride(0), a.stride(1), b, rows, b.shape[1], b.stride(0), b.stride(1),
        tiles_a, amax, BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=4,
    )
    ptiles_a = triton.cdiv(rows_pad, br) * triton.cdiv(a.shape[1], bc)
    ptiles_b = triton.cdiv(rows_pad, br) * triton.cdiv(b.shape[1], bc)
    _cast_kernel[(ptiles_a + ptiles_b,)](
        a, a8, a.shape[1], a.stride(0), a.stride(1), b, b8, b.shape[1], b.stride(0), b.stride(1),
        rows, rows_pad, ptiles_a, amax, scales, BLOCK_ROWS=br, BLOCK_COLS=bc, num_warps=4,
    )
    return a8, b8, scales[0:1], scales[1:2]


def scaled_mm(a8, b8, s_a, s_b) -> torch.Tensor:
    """``(a8 · s_a) @ (b8 · s_b)ᵀ`` in fp32 through ``torch._scaled_mm`` (a8 ``[out, R16]``, b8 ``[in, R16]``)."""
    return torch._scaled_mm(a8, b8.t(), s_a.reshape(()), s_b.reshape(()), out_dtype=torch.float32)


_scaled_mm_ok: dict[str, bool] = {}


def scaled_mm_works(device: torch.device) -> bool:
    """Checks once per device, on a small problem, that :func:`scaled_mm` runs and is right."""
    key = str(device)
    if key not in _scaled_mm_ok:
        refuse_capture(device, "the first fp8 abs-GEMM on this device",
                       "it checks once, with a host sync, that torch._scaled_mm works")
        ok = False
        try:
            g = torch.Generator(device="cpu").manual_seed(0)
            a8 = (torch.rand(32, 48, generator=g) * 8).to(torch.float8_e4m3fn)
            b8 = (torch.rand(16, 48, generator=g) * 8).to(torch.float8_e4m3fn)
            s = torch.tensor([0.5])
            want = (a8.double() @ b8.double().t() * 0.25).float()
            got = scaled_mm(a8.to(device), b8.to(device), s.to(device), s.to(device)).cpu()
            ok = bool(torch.allclose(got, want, rtol=1e-5, atol=1e-5))
        except Exception as exc:  # noqa: BLE001 - a private op: absent or changed means "use the Triton GEMM"
            log.warning("mas_local.kernels: torch._scaled_mm unusable on %s (%s); fp8 uses the Triton GEMM",
                        device, exc)
        _scaled_mm_ok[key] = ok
    return _scaled_mm_ok[key]
