"""Which positions count (``docs/math.md``, "Masks").

With a mask ``[B, T]`` (by default a dict batch's ``attention_mask``), only real
positions count: the global loss sums ‖f(x_k)‖² over sample k's real positions, and
in local mode a module's Δ (``½‖y_k‖²``) and its Hebbian events use real positions only,
wherever an activation is laid out with positions next to the batch dimension
(``[B, T, ...]``, ``[T, B, ...]`` or flattened tokens ``[B·T, ...]``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layouts import FLAT, BatchDim


def aligned_mask(t: Tensor, dim: BatchDim, mask: Tensor, features: bool = False) -> Tensor | None:
    """``mask`` shaped to broadcast against ``t`` (bool), or ``None`` when ``t`` has no positions axis.

    ``features``: ``t`` is a module's activation, whose last dimension holds features: a 2-D ``[B, F]``
    has no positions axis even when F equals the mask's length.
    """
    n, positions = mask.shape
    ones = [1] * (t.dim() - 2)
    if features and dim in (0, 1) and t.dim() < 3:
        return None
    if dim == 0 and t.dim() >= 2 and t.shape[0] == n and t.shape[1] == positions:
        return mask.view(n, positions, *ones)
    if dim == 1 and t.dim() >= 2 and t.shape[0] == positions and t.shape[1] == n:
        return mask.t().reshape(positions, n, *ones)
    if dim == FLAT and t.dim() >= 1 and t.shape[0] == n * positions:
        return mask.reshape(n * positions, *([1] * (t.dim() - 1)))
    return None


def masked_squared_norm(out: Tensor, mask: Tensor | None) -> Tensor:
    """Σ_k ‖f(x_k)‖² over real positions (all positions when the output has no positions axis)."""
    f = out if out.dtype == torch.float64 else out.float()
    # 2·Σ f.detach()·f: the same value and gradient 2f as Σ f², but its backward makes one tensor of f's size
    # (Δ itself) where pow's makes three (a language model's logits: three times [B, T, vocab])
    weight = f.detach()
    if mask is not None:
        m = aligned_mask(out, 0, mask)
        if m is not None:
            weight = weight * m
    return 2 * (weight * f).sum()


def row_mask(x: Tensor, dim: BatchDim, mask: Tensor) -> Tensor | None:
    """Which rows of ``x.reshape(-1, x.shape[-1])`` are real positions, or ``None`` (all rows count)."""
    m = aligned_mask(x, dim, mask, features=True)
    if m is None or x.dim() < 2:
        return None
    return m.expand(*x.shape[:-1], 1).reshape(-1)
