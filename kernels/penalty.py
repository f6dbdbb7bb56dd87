"""Triton fused MAS penalty: ``grad += 2λ Ω (θ − θ*)`` and the value ``λ Σ Ω (θ − θ*)²``.

Design (multi-tensor, memory-bound, deterministic):

* Each tensor is cut into chunks of :data:`CHUNK` elements; chunk j of the whole
  call (tensors in list order) owns slot j of an fp64 partial buffer. Tensors are
  grouped by their four dtypes (grad, θ, θ*, Ω) and by the 16-byte alignment of θ,
  θ*, Ω; each group is one launch over a *chunk table* whose rows hold the tensor's
  index in the group, the element offsets of its θ, θ*, Ω relative to the group's
  first tensors (passed as base pointers), the chunk's start, the tensor's length
  and the chunk's slot. A program processes one chunk (full chunks unmasked with
  16-byte vector hints in aligned groups, the tail masked) and stores its fp32
  partial sum as fp64 in its slot; one single-program kernel sums the slots in
  order in fp64 and multiplies by λ. No float atomics, and the summation order
  depends only on the tensors' shapes and order — not on their addresses, their
  grouping or the GPU — so the same inputs give a bit-identical value.
* Caches: the chunk table depends on the addresses of θ, θ*, Ω (stable across
  training steps) and is built once and kept on the device. The grads' offsets are
  a separate small per-group array, cached by the grads' addresses; after
  ``zero_grad(set_to_none=True)`` (new grads every step) only that array — one
  int64 per tensor — is rebuilt, from pinned memory with a non-blocking copy.
* Layouts, per tensor: the four tensors are walked as flat arrays in memory order
  when they share strides and are dense (contiguous, channels_last, …: no copy).
  Otherwise θ, θ*, Ω are copied into the grad's layout, and a non-dense grad is
  computed in a contiguous copy and written back. float64 tensors run the torch
  reference for that tensor only, its sum going into its slot.
* CUDA graphs: under capture nothing may be copied from the host, so both tables
  must already be cached (a warm-up call with the same tensors before capturing);
  otherwise the call raises a clear error. Tables used by a capture are kept alive.

Per element: read grad, θ, θ*, Ω once, write grad once (20 B/param with fp32
everything, 18 B with a bf16 Ω). Arithmetic in fp32; grad is rounded once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, capturing, notice_reference, on_device, refuse_capture

BLOCK = 64 if INTERPRET else 2048
ITERS = 2 if INTERPRET else 32
CHUNK = BLOCK * ITERS
RED_BLOCK = 64 if INTERPRET else 1024
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_CACHE_SIZE = 16
_tables: OrderedDict = OrderedDict()  # static chunk tables
_grad_offsets: OrderedDict = OrderedDict()  # per-group grad offsets
_captured: list = []  # tables referenced by captured CUDA graphs: never freed
TABLE_COLUMNS = 7  # tensor index in group, θ offset, θ* offset, Ω offset, chunk start, tensor length, slot


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
    g_base, p_base, a_base, o_base, table_ptr, grad_off_ptr, part_ptr, two_lam,
    ALIGN_GRAD: tl.constexpr, ALIGN_PARAM: tl.constexpr, ALIGN_ANCHOR: tl.constexpr, ALIGN_OMEGA: tl.constexpr,
    BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    row = table_ptr + tl.program_id(0).to(tl.int64) * 7
    g_off = tl.multiple_of(tl.load(grad_off_ptr + tl.load(row)), ALIGN_GRAD)
    p_off = tl.multiple_of(tl.load(row + 1), ALIGN_PARAM)
    a_off = tl.multiple_of(tl.load(row + 2), ALIGN_ANCHOR)
    o_off = tl.multiple_of(tl.load(row + 3), ALIGN_OMEGA)
    start = tl.multiple_of(tl.load(row + 4), BLOCK * ITERS)
    end = tl.load(row + 5)
    slot = tl.load(row + 6)
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
    tl.store(part_ptr + slot, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _final_sum_kernel(part_ptr, n, lam, out_ptr, BLOCK: tl.constexpr):
    """out = λ · Σ partials, one program, fixed order: deterministic."""
    acc = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(0, n, BLOCK):
        idx = start + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + idx, mask=idx < n, other=0.0)
    total = tl.sum(acc, axis=0) * lam
    tl.store(out_ptr, total.to(tl.float32))


# --------------------------------------------------------------------------- layouts


def dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive slots of memory (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def walkable(g, p, a, o):
    """``(g, p, a, o, write_back)``: four tensors that can be walked as flat arrays in one element order.

    No copy when they share strides and are dense; otherwise the mismatched ones are
    copied into the grad's layout (a non-dense grad into a contiguous copy that
    ``write_back = (grad, copy)`` returns to).
    """
    if g.is_contiguous() and p.is_contiguous() and a.is_contiguous() and o.is_contiguous():
        return g, p, a, o, None
    write_back = None
    target = g
    if not dense(g):
        target = g.contiguous()
        write_back = (g, target)
    same = [t if t.stride() == target.stride() else torch.empty_like(target, dtype=t.dtype).copy_(t)
            for t in (p, a, o)]
    return (target, *same, write_back)


# --------------------------------------------------------------------------- tables


def _upload(rows: list, device: torch.device) -> torch.Tensor:
    host = torch.tensor(rows, dtype=torch.int64)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)  # the pinned block is held until the copy is done


def _lookup(cache: OrderedDict, key, device, build, what: str):
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
        if capturing(device):
            _captured.append(value)  # the graph reads it at every replay
        return value
    refuse_capture(device, "penalty_grad_ (triton)", f"its {what} for these tensors is not on the device yet")
    value = build()
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def static_table(device, dtypes, members):
    """The chunk table of a group: rows of :data:`TABLE_COLUMNS` int64 (cached by θ, θ*, Ω addresses)."""
    ptrs = [(p.data_ptr(), a.data_ptr(), o.data_ptr(), n, slot) for _, p, a, o, n, slot in members]
    sizes = [t.element_size() for t in members[0][1:4]]

    def build():
        base = ptrs[0][:3]
        rows = []
        for index, (pp, ap, op, n, slot) in enumerate(ptrs):
            offs = [(ptr - b) // s for ptr, b, s in zip((pp, ap, op), base, sizes)]
            for c, start in enumerate(range(0, n, CHUNK)):
                rows.append([index, *offs, start, n, slot + c])
        return _upload(rows, device)

    return _lookup(_tables, (str(device), dtypes, tuple(ptrs)), device, build, "chunk table")


def grad_offsets(device, members):
    """Offsets of the group's grads from its first grad, in elements (cached by the grads' addresses)."""
    ptrs = tuple(g.data_ptr() for g, *_ in members)
    size = members[0][0].element_size()
    build = lambda: _upload([(ptr - ptrs[0]) // size for ptr in ptrs], device)
    return _lookup(_grad_offsets, (str(device), size, ptrs), device, build, "grad offset table")


# --------------------------------------------------------------------------- entry point


def _align(t: torch.Tensor, aligned: bool) -> int:
    return 16 // t.element_size() if aligned else 1


def penalty_grad_(grads, params, anchors, omegas, lam: float) -> torch.Tensor:
    """``grad += 2λ Ω (θ − θ*)`` for every tensor; returns ``λ Σ Ω (θ − θ*)²`` as a 0-d fp32 tensor."""
    device = params[0].device if len(params) else torch.device("cpu")
    groups: dict[tuple, list] = {}
    by_reference, write_backs = [], []
    slots = 0
    with on_device(device):
        for g, p, a, o in zip(grads, params, anchors, omegas):
            n = p.numel()
            if n == 0:
                continue
            dtypes = (g.dtype, p.dtype, a.dtype, o.dtype)
            if not (all(d in _SUPPORTED for d in dtypes) and o.dtype != torch.float16):
                notice_reference("penalty_grad_", f"tensors of dtypes {dtypes}")
                by_reference.append((slots, g, p, a, o))
                slots += 1
                continue
            g, p, a, o, write_back = walkable(g, p, a, o)
            if write_back is not None:
                write_backs.append(write_back)
            aligned = (p.data_ptr() | a.data_ptr() | o.data_ptr()) % 16 == 0
            groups.setdefault((dtypes, aligned), []).append((g, p, a, o, n, slots))
            slots += triton.cdiv(n, CHUNK)
        out = torch.zeros((), dtype=torch.float32, device=device)
        if slots == 0:
            return out
        partials = torch.empty(slots, dtype=torch.float64, device=device)
        for (dtypes, aligned), members in groups.items():
            table = static_table(device, dtypes, members)
            g_offsets = grad_offsets(device, members)
            g_aligned = all(m[0].data_ptr() % 16 == 0 for m in members)
            g0, p0, a0, o0 = members[0][:4]
            _penalty_kernel[(table.shape[0],)](
                g0, p0, a0, o0, table, g_offsets, partials, float(2.0 * lam),
                ALIGN_GRAD=_align(g0, g_aligned), ALIGN_PARAM=_align(p0, aligned),
                ALIGN_ANCHOR=_align(a0, aligned), ALIGN_OMEGA=_align(o0, aligned),
                BLOCK=BLOCK, ITERS=ITERS, num_warps=8,
            )
        for slot, g, p, a, o in by_reference:
            # the reference's arithmetic, for this tensor alone: in float64 (θ − θ* before rounding)
            wide = torch.float64 if p.dtype == torch.float64 else torch.float32
            diff = p.detach().to(wide) - a.to(wide)
            weighted = o.to(wide) * diff
            g.add_((2.0 * lam * weighted).to(g.dtype))
            partials[slot : slot + 1].copy_((weighted * diff).sum(dtype=torch.float64).reshape(1))
        _final_sum_kernel[(1,)](partials, slots, float(lam), out, BLOCK=RED_BLOCK, num_warps=4)
        for g, copy in write_backs:
            g.copy_(copy)
    return out
