"""The importance pass on FSDP2 (``fully_shard``) models: each rank keeps only its shard of the sums.

Rules write a parameter's contribution into a full-size pending buffer; pending
buffers are all-reduced over the sync group and cut to the local shard when they
would exceed ``flush_bytes`` and after every batch. The transient full-size memory
is thus ``flush_bytes`` plus one parameter, not the model. Every rank must run the
same number of batches (FSDP2 requires it for the forward anyway): the flushes are
collectives issued in the same order on all ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..importance.estimator import Estimator
from ..importance.statistics import Statistics, sum_dtype
from .fsdp import DTensor, HoldUnsharded, is_dtensor, shard_like, shard_of
from .groups import SYNC_BUCKET_BYTES


class ShardedStatistics(Statistics):
    """Statistics whose sums for DTensor parameters are this rank's shard only."""

    def __init__(self, params, fingerprint, group: Any = None, flush_bytes: int | None = None) -> None:
        super().__init__(params, fingerprint)
        self.group = group
        self.flush_bytes = SYNC_BUCKET_BYTES if flush_bytes is None else int(flush_bytes)
        self.presynced = {name for name, p in params.items() if is_dtensor(p)}  # reduced at every flush
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0

    def sum_shape(self, p):
        return shard_of(p).shape if self.names[id(p)] in self.presynced else p.shape

    def sum_of(self, p):
        name = self.names[id(p)]
        if name not in self.presynced:
            return super().sum_of(p)
        self.writes += 1
        buf = self._pending.get(name)
        if buf is None:
            size = sum_dtype(p).itemsize * p.numel()
            if self._pending and self._pending_bytes + size > self.flush_bytes:
                self.flush()
            buf = self._pending[name] = torch.zeros(p.shape, dtype=sum_dtype(p), device=shard_of(p).device)
            self._pending_bytes += size
        return buf

    def restart(self, counts: dict[str, int]) -> None:
        super().restart(counts)
        self._pending, self._pending_bytes = {}, 0

    def flush(self) -> None:
        """All-reduce the pending full-size contributions and add this rank's shard to the sums."""
        if not self._pending:
            return
        names = list(self._pending)  # the same order on every rank
        flat = torch.cat([self._pending[n].reshape(-1) for n in names])
        self._pending, self._pending_bytes = {}, 0
        if self.group is not None:
            dist.all_reduce(flat, group=self.group)
        offset = 0
        for name in names:
            p = self.params[name]
            full = flat[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
            shard = shard_like(full, p).to_local().to(sum_dtype(p))  # cat promotes a mixed bucket
            if name in self.sums:
                self.sums[name].add_(shard)
            else:
                self.sums[name] = shard.clone()

    def result(self, covers_all: bool = False, release: bool = False):
        out = super().result(covers_all, release)
        for name in self.presynced:
            p = self.params[name]
            omega = (
                out[name] if out[name].shape == shard_of(p).shape else torch.zeros_like(shard_of(p), dtype=sum_dtype(p))
            )
            out[name] = DTensor.from_local(omega, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        return out


class ShardedEstimator(Estimator):
    """An :class:`~mas_local.importance.Estimator` for FSDP2 models (see the module docstring)."""

    batch_by_autograd = False  # the sharded parameters are not in the graph: use the per-module rules

    def __init__(self, *args, group: Any = None, flush_bytes: int | None = None, **kwargs) -> None:
        self._group, self._flush_bytes = group, flush_bytes
        super().__init__(*args, **kwargs)

    def make_statistics(self) -> Statistics:
        return ShardedStatistics(self.params, self.fingerprint(), self._group, self._flush_bytes)

    def update(self, batch) -> None:
        if self.mode == "global":
            with HoldUnsharded(self.model):
                super().update(batch)
        else:
            super().update(batch)
        self.stats.flush()
