"""Data-parallel importance passes: wrappers, process groups, and the all-reduce of the statistics.

Each rank runs the pass on its own share of the data; the sufficient statistics
(float32 or float64 sums, counts, samples, batches, coverage) are then all-reduced, so every
rank ends with the Ω a single process would get on all the data (up to float
summation order). DDP / DataParallel wrappers and ``torch.compile`` are looked through:
estimation runs on the inner module and parameters keep its names (``docs/distributed.md``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .fsdp import shard_of

SYNC_BUCKET_BYTES = 64 << 20


def unwrap(model: nn.Module) -> nn.Module:
    """The module MAS estimates and names parameters by.

    DDP / DataParallel wrappers (``.module``) and ``torch.compile``'s ``OptimizedModule``
    (``._orig_mod``) are looked through, in any nesting (DDP of a compiled module, a
    compiled DDP): parameter names carry no ``module.`` / ``_orig_mod.`` prefix, and the
    importance pass runs eagerly on the original module.
    """
    wrappers: tuple[type, ...] = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    # torch._dynamo is imported by torch.compile; a model can only be compiled if it is loaded
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    compiled = getattr(eval_frame, "OptimizedModule", None)
    while True:
        if isinstance(model, wrappers):
            model = model.module
        elif compiled is not None and isinstance(model, compiled):
            model = model._orig_mod
        else:
            return model


def resolve_group(sync: bool | None, process_group: Any = None) -> Any:
    """The process group to all-reduce statistics over, or ``None`` for a single-process pass."""
    if sync not in (None, True, False):
        raise ValueError(f"sync must be None, True or False, got {sync!r}")
    if sync is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if sync:
            raise RuntimeError("sync=True needs an initialised torch.distributed process group")
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    if dist.get_world_size(group) <= 1:
        return None
    return group


def sync_statistics(stats, group: Any, bucket_bytes: int = SYNC_BUCKET_BYTES) -> None:
    """All-reduce a pass's :class:`~mas_local.importance.statistics.Statistics` over ``group`` in place.

    Every rank must call this with statistics of the same model and settings; the sums
    travel in flat buckets (one per device and dtype) of at most ``bucket_bytes``. Sums that a subclass
    keeps sharded and reduced already (``presynced``) are skipped.
    """
    stats.flush()
    names = list(stats.params)
    presynced = getattr(stats, "presynced", set())
    for name in names:
        if name not in presynced:
            stats.sum_of(stats.params[name])  # ranks that never saw a parameter contribute zeros
    by_kind: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name in names:
        if name not in presynced:
            by_kind.setdefault((stats.sums[name].device, stats.sums[name].dtype), []).append(name)
    for names_of_kind in by_kind.values():
        bucket: list[str] = []
        size = 0
        for name in names_of_kind + [None]:
            nbytes = 0 if name is None else stats.sums[name].numel() * stats.sums[name].element_size()
            if name is not None and (not bucket or size + nbytes <= bucket_bytes):
                bucket.append(name)
                size += nbytes
                continue
            flat = torch.cat([stats.sums[k].reshape(-1) for k in bucket])
            dist.all_reduce(flat, group=group)
            offset = 0
            for k in bucket:
                numel = stats.sums[k].numel()
                stats.sums[k].copy_(flat[offset : offset + numel].view_as(stats.sums[k]))
                offset += numel
            bucket, size = ([name], nbytes) if name is not None else ([], 0)
    device = shard_of(stats.params[names[0]]).device
    meta = torch.tensor(
        [stats.counts[k] for k in names]
        + [int(k in stats.seen) for k in names]
        + [int(k in stats.sampled) for k in names]
        + [stats.samples, stats.batches],
        dtype=torch.int64,
        device=device,
    )
    dist.all_reduce(meta, group=group)
    values = meta.tolist()
    count = len(names)
    stats.counts = {k: int(values[i]) for i, k in enumerate(names)}
    stats.seen = {k for i, k in enumerate(names) if values[count + i] > 0}
    stats.sampled = {k for i, k in enumerate(names) if values[2 * count + i] > 0}
    stats.samples, stats.batches = int(values[3 * count]), int(values[3 * count + 1])
