"""The MAS penalty on FSDP2 models: local shards, the value summed over the shard groups."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from .fsdp import shard_groups, shard_of, sum_over_shards


def sharded_penalty(mas) -> Tensor:
    """``λ Σ Ω (θ − θ*)²`` for sharded parameters: local shards, value summed over the shard groups.

    The gradient flows only through this rank's own terms (coefficient 1): the
    all-reduced remainder is detached, so backward does not multiply the penalty
    gradient by the number of ranks.
    """
    parts: dict[tuple, Tensor] = {}
    for _, p, anchor, omega in mas._terms():
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32  # θ − θ* before rounding
        term = (shard_of(omega).to(wide) * (shard_of(p).to(wide) - shard_of(anchor).to(wide)).pow(2)).sum()
        key = tuple(shard_groups(p))
        parts[key] = parts[key] + term if key in parts else term
    if not parts:
        return torch.zeros((), device=shard_of(next(iter(mas.params.values()))).device)
    mine = sum(parts.values())
    total = sum_over_shards(parts)
    return mas.lam * (mine + (total - mine.detach()))


def sharded_add_penalty_grad_(mas, terms) -> Tensor:
    """The fused penalty on local shards (grad shards updated in place); value summed over the shard groups."""

    groups: dict[tuple, list] = {}
    for _, p, anchor, omega in terms:
        groups.setdefault(tuple(shard_groups(p)), []).append((p, anchor, omega))
    parts = {}
    with torch.no_grad():
        for key, items in groups.items():
            parts[key] = ops.penalty_grad_(
                [shard_of(p.grad) for p, _, _ in items],
                [shard_of(p.detach()) for p, _, _ in items],
                [shard_of(a) for _, a, _ in items],
                [shard_of(o) for _, _, o in items],
                mas.lam,
                mas.backend,
            )
        return sum_over_shards(parts)
