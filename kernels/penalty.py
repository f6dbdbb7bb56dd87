"""Triton fused MAS penalty: ``grad += 2λ Ω (θ − θ*)`` and the value ``λ Σ Ω (θ − θ*)²``.

Design (multi-tensor, memory-bound, deterministic):

* The tensors are grouped by their four dtypes (grad, θ, θ*, Ω) and by 16-byte
  alignment. Each group is one launch over a *chunk table*: one row per chunk of
  :data:`CHUNK` elements of one tensor, holding the element offsets of that
  tensor's grad, θ, θ*, Ω relative to the group's first tensors (passed as the
  kernel's base pointers), the chunk's start and the tensor's length. A program
  processes one chunk: full chunks unmasked (16-byte vector loads: the offsets
  carry ``tl.multiple_of`` hints in aligned groups), the tail chunk masked.
  The table is built on the host once per set of tensor addresses and cached
  on the device (a training loop reuses the same parameters every step).
* Per element: read grad, θ, θ*, Ω once, write grad once (20 B/param with fp32
  everything, 18 B with a bf16 Ω). Arithmetic in fp32; grad is rounded once to
  its own dtype.
* The value: each program writes its chunk's fp32 partial sum (a fixed-shape
  ``tl.sum``) as fp64 into its own slot of a partial buffer; one single-program
  kernel then sums all slots in a fixed order in fp64 and multiplies by λ. No
  float atomics: the same inputs give a bit-identical value every run.

Launches: one per dtype group plus one for the final reduction (two in the
common case). grad, θ, θ* may be fp32, fp16 or bf16; Ω fp32 or bf16. A call with
a non-contiguous tensor or another dtype (float64) runs the torch reference for
all its tensors (logged once), so ``backend="auto"`` never fails on them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from mas_local.ops import reference

from .abs_gemm import INTERPRET, _notice_reference

BLOCK = 64 if INTERPRET else 2048
ITERS = 2 if INTERPRET else 32
CHUNK = BLOCK * ITERS
RED_BLOCK = 64 if INTERPRET else 1024
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_TABLE_CACHE: OrderedDict = OrderedDict()
_TABLE_CACHE_SIZE = 16


@triton.jit
def _chunk_math(g_ptr, p_ptr, a_ptr, o_ptr, idx, mask, two_lam, MASKED: tl.constexpr):
    if MASKED:
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(o_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        p = tl.load(p_ptr + idx).to(tl.float32)
        a = tl.load(a_ptr + idx).to(tl.float32)
        o = tl.load(o_ptr + idx).to(tl.float32)
        g = tl.load(g_ptr + idx).to(tl.float32)
    d = p - a
    w = o * d
    g = g + w * two_lam
    if MASKED:
        tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty))
    return w * d


@triton.jit
def _penalty_kernel(
    g_base,
    p_base,
    a_base,
    o_base,
    table_ptr,
    part_ptr,
    two_lam,
    AG: tl.constexpr,
    AP: tl.constexpr,
    AA: tl.constexpr,
    AO: tl.constexpr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + pid.to(tl.int64) * 6
    g_off = tl.multiple_of(tl.load(row), AG)
    p_off = tl.multiple_of(tl.load(row + 1), AP)
    a_off = tl.multiple_of(tl.load(row + 2), AA)
    o_off = tl.multiple_of(tl.load(row + 3), AO)
    start = tl.multiple_of(tl.load(row + 4), BLOCK * ITERS)
    end = tl.load(row + 5)
    g_ptr = g_base + g_off
    p_ptr = p_base + p_off
    a_ptr = a_base + a_off
    o_ptr = o_base + o_off
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if start + BLOCK * ITERS <= end:
        for i in range(ITERS):
            idx = start + i * BLOCK + lanes
            acc += _chunk_math(g_ptr, p_ptr, a_ptr, o_ptr, idx, idx < end, two_lam, False)
    else:
        for i in range(ITERS):
            idx = start + i * BLOCK + lanes
            acc += _chunk_math(g_ptr, p_ptr, a_ptr, o_ptr, idx, idx < end, two_lam, True)
    tl.store(part_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _final_sum_kernel(part_ptr, n, lam, out_ptr, BLOCK: tl.constexpr):
    """out = λ · Σ partials, one program, fixed order: deterministic."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < n, other=0.0)
    total = tl.sum(acc, axis=0) * lam
    tl.store(out_ptr, total.to(tl.float32))


def _align(t: torch.Tensor) -> int:
    return 16 // t.element_size()


def _table(group, device):
    """The device chunk table of a group (cached by dtypes, addresses and lengths).

    ``group`` holds ``(tensors, addresses, numel)`` entries of one dtype combination.
    """
    dtypes = tuple(t.dtype for t in group[0][0])  # offsets are in elements of these dtypes
    key = (device, dtypes, tuple((ptrs, n) for _, ptrs, n in group))
    cached = _TABLE_CACHE.get(key)
    if cached is not None:
        _TABLE_CACHE.move_to_end(key)
        return cached
    base_ptrs = group[0][1]
    sizes = [t.element_size() for t in group[0][0]]
    rows = []
    for _, ptrs, n in group:
        offs = [(ptr - base) // size for ptr, base, size in zip(ptrs, base_ptrs, sizes)]
        for start in range(0, n, CHUNK):
            rows.append(offs + [start, n])
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    _TABLE_CACHE[key] = table
    if len(_TABLE_CACHE) > _TABLE_CACHE_SIZE:
        _TABLE_CACHE.popitem(last=False)
    return table


def _kernel_dtypes(key) -> bool:
    return all(dtype in _SUPPORTED for dtype in key[:4]) and key[3] != torch.float16


def penalty_grad_(grads, params, anchors, omegas, lam: float) -> torch.Tensor:
    """``grad += 2λ Ω (θ − θ*)`` for every tensor; returns ``λ Σ Ω (θ − θ*)²`` as a 0-d fp32 tensor."""
    device = params[0].device if len(params) else torch.device("cpu")
    # One pass with few attribute reads per tensor: the host cost is paid every training step.
    groups: dict[tuple, list] = {}
    for quad in zip(grads, params, anchors, omegas):
        g, p, a, o = quad
        if not (g.is_contiguous() and p.is_contiguous() and a.is_contiguous() and o.is_contiguous()):
            # Rare (parameters and their grads are contiguous): the reference handles any layout,
            # for the whole call so that the value keeps one fixed summation order.
            _notice_reference("penalty_grad_", "non-contiguous tensors")
            return reference.penalty_grad_(grads, params, anchors, omegas, lam)
        n = p.numel()
        if n == 0:
            continue
        ptrs = (g.data_ptr(), p.data_ptr(), a.data_ptr(), o.data_ptr())
        key = (g.dtype, p.dtype, a.dtype, o.dtype, (ptrs[0] | ptrs[1] | ptrs[2] | ptrs[3]) % 16 == 0)
        members = groups.get(key)
        if members is None:
            if not _kernel_dtypes(key):
                _notice_reference("penalty_grad_", f"dtypes {key[:4]}")
                return reference.penalty_grad_(grads, params, anchors, omegas, lam)
            members = groups[key] = []
        members.append((quad, ptrs, n))
    out = torch.zeros((), dtype=torch.float32, device=device)
    if not groups:
        return out
    tables = [(key, group, _table(group, device)) for key, group in groups.items()]
    n_parts = sum(t.shape[0] for _, _, t in tables)
    partials = torch.empty(n_parts, dtype=torch.float64, device=device)
    pos = 0
    for (_, _, _, _, aligned), group, table in tables:
        g0, p0, a0, o0 = group[0][0]
        align = [(_align(t) if aligned else 1) for t in (g0, p0, a0, o0)]
        n = table.shape[0]
        _penalty_kernel[(n,)](
            g0, p0, a0, o0, table, partials[pos:], float(2.0 * lam),
            AG=align[0], AP=align[1], AA=align[2], AO=align[3], BLOCK=BLOCK, ITERS=ITERS, num_warps=8,
        )
        pos += n
    _final_sum_kernel[(1,)](partials, n_parts, float(lam), out, BLOCK=RED_BLOCK, num_warps=4)
    return out
