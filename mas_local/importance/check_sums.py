"""The self-check's sums in bounded memory (``docs/math.md``, "The self-check").

The check compares two sums over a subset of samples, per parameter: the engine's and an independent one. Both
are linear in the per-sample gradients, so each side is added piece by piece (a call, a sample, a block of rows)
as it is computed. A parameter of at most ``EXACT_NUMEL`` elements is held whole and compared element by element
(so is a long vector, whose sketch would be no smaller). A larger one (an embedding and tied LM head of
50257 × 768, a Llama MLP matrix) is held as a sketch: viewed as a matrix G of m rows, the check keeps R·G
([r, n]) and G·Q ([m, r]) with Gaussian R ([r, m], scaled by 1/√m) and Q ([n, r], by 1/√n) drawn from the
check's generator and shared by both sides. A sum that differs anywhere differs in its sketch with probability
1; an error in one element shows once it exceeds about √n (or √m) times the tolerance relative to the largest
sketched value, which a row given to the wrong sample exceeds by far. The sketch costs r·(m + n) numbers per
side instead of m·n (a float32 Ω-sized copy per side before).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

EXACT_NUMEL = 1 << 16  # parameters up to this many elements are compared whole
SKETCH_RANK = 8


class Sketcher:
    """The random projections of one check, one pair per parameter (both sides of the check share them)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator
        self._base: dict[int, tuple[Tensor, Tensor]] = {}  # float64 on the CPU, drawn once per parameter
        self._pairs: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}

    def pair(self, p: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(R, Q) for parameter ``p`` in ``dtype`` on ``p``'s device: the same draw in every dtype."""
        if id(p) not in self._base:
            m, n = _rows_cols(p.shape)
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
            g = torch.Generator().manual_seed(seed)
            r = torch.randn(SKETCH_RANK, m, generator=g, dtype=torch.float64) / math.sqrt(m)
            q = torch.randn(n, SKETCH_RANK, generator=g, dtype=torch.float64) / math.sqrt(n)
            self._base[id(p)] = (r, q)
        key = (id(p), dtype)
        if key not in self._pairs:
            r, q = self._base[id(p)]
            self._pairs[key] = (r.to(p.device, dtype), q.to(p.device, dtype))
        return self._pairs[key]


def _rows_cols(shape: torch.Size) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    m = shape[0]
    return m, max(1, math.prod(shape) // max(1, m))


def sketched(p: Tensor) -> bool:
    """Whether ``p``'s sums are held as a sketch: large, and not so narrow (a long vector) that the sketch,
    r·(m + n) numbers, would not be smaller than the sum itself."""
    m, n = _rows_cols(p.shape)
    return p.numel() > EXACT_NUMEL and SKETCH_RANK * (m + n) < p.numel()


class CheckSums:
    """One side's sums, by parameter id: whole, or sketched (:class:`Sketcher`)."""

    def __init__(self, sketcher: Sketcher) -> None:
        self.sketcher = sketcher
        self.totals: dict[int, Tensor] = {}

    def add(self, p: Tensor, g: Tensor, rows: slice | None = None) -> None:
        """Add ``g``, a sum of ``p``'s shape, or (``rows``) the sum of rows ``rows`` of ``p`` (dim 0)."""
        pid = id(p)
        if not sketched(p):
            if pid not in self.totals:
                self.totals[pid] = torch.zeros(p.shape, dtype=g.dtype, device=g.device)
            target = self.totals[pid] if rows is None else self.totals[pid][rows]
            target.add_(g.to(target.dtype))
            return
        m, n = _rows_cols(p.shape)
        r, q = self.sketcher.pair(p, g.dtype)
        rows = slice(0, m) if rows is None else rows
        mat = g.reshape(rows.stop - rows.start, n)
        if pid not in self.totals:
            self.totals[pid] = torch.zeros(SKETCH_RANK * n + m * SKETCH_RANK, dtype=g.dtype, device=g.device)
        total = self.totals[pid]
        if total.dtype != g.dtype:  # a float64 piece of a float32 sum (or the reverse): one dtype per side
            mat = mat.to(total.dtype)
            r, q = self.sketcher.pair(p, total.dtype)
        left = total[: SKETCH_RANK * n].view(SKETCH_RANK, n)
        right = total[SKETCH_RANK * n :].view(m, SKETCH_RANK)
        left.addmm_(r[:, rows], mat)
        right[rows].addmm_(mat, q)

    def get(self, pid: int) -> Tensor | None:
        return self.totals.get(pid)

    def __contains__(self, pid: int) -> bool:
        return pid in self.totals

    def __iter__(self):
        return iter(self.totals)

    def __bool__(self) -> bool:
        return bool(self.totals)
