"""From the captured calls of one batch to sums and counts, per estimator (``docs/math.md``).

``sample``: a parameter computed at one call goes through its rule's fused path
(``add_sample_abs``); one computed at several calls (tied weights, a layer called
twice, a weight read by two modules) gets its per-sample gradients summed over the
calls before the absolute value, in batch chunks. Counts: samples.

``batch``: the signed batch gradient Σ_k g_k summed over all calls, then |·| / b_B.
Counts: batches, so Ω = (1/#B) Σ_B |g_B| / b_B, what the official code and Avalanche compute.

``hebbian``: every call is its own set of co-activation events (Linear/Conv rules);
other modules use the per-call ``sample`` statistic and count samples.

A call shared by the whole batch (no batched input: a position embedding on ids
``[1, T]``) reaches the reduction in local mode only: its one gradient is every
sample's gradient (global mode computes such parameters at an enclosing module).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .capture import Site, replicated
from .plan import Plan
from .statistics import Statistics, sum_dtype


def _has_delta(site: Site) -> bool:
    return any(d is not None for d in site.deltas)


def reduce_sites(acc: Any, sites: list[Site], plan: Plan) -> None:
    n = acc.batch_samples
    estimator = acc.estimator
    calls: dict[int, int] = {}
    for s in sites:
        for _, params in plan.sites[id(s.module)].groups:
            for p in params.values():
                calls[id(p)] = calls.get(id(p), 0) + 1
                acc.stats.seen.add(acc.names[id(p)])
    if estimator == "batch":
        _reduce_batch(acc, sites, plan, n)
    elif estimator == "hebbian":
        _reduce_hebbian(acc, sites, plan, n)
    else:
        _reduce_sample(acc, sites, plan, n, {pid for pid, k in calls.items() if k > 1})


def reduce_call(acc: Any, site: Site, plan: Plan) -> None:
    """Local mode, streamed: one call's sums and counts as soon as it returns (:mod:`.streaming`). The caller
    streams only calls whose ``sample``-statistic parameters no other call of the batch reads, so nothing
    needs summing over calls before |·|; the batch's sample count is added with the rest of the batch."""
    n = acc.batch_samples
    groups = plan.sites[id(site.module)].groups
    for rule, params in groups:
        for p in params.values():
            acc.stats.seen.add(acc.names[id(p)])
        if acc.estimator == "hebbian" and rule.hebbian:
            rule.add_hebbian(acc, site if site.batched or n == 1 else replicated(site, n), params)
            continue
        if acc.estimator == "hebbian":
            for p in params.values():
                acc.stats.sampled.add(acc.names[id(p)])
        if _has_delta(site):
            add_sample_abs(acc, rule, site, params, n)


def _reduce_batch(acc: Any, sites: list[Site], plan: Plan, n: int) -> None:
    signed: dict[int, tuple[Any, Tensor]] = {}
    for s in sites:
        if not _has_delta(s):
            continue
        for rule, params in plan.sites[id(s.module)].groups:
            for name, g in rule.batch_grads(acc, s, params).items():
                p = params[name]
                signed[id(p)] = (p, g if id(p) not in signed else signed[id(p)][1] + g)
    for p, g in signed.values():
        acc.add_sum(p, g.abs() / n)
    acc.stats.count_all(1)


def add_sample_abs(acc: Any, rule: Any, site: Site, params: dict, n: int) -> None:
    if site.batched:
        rule.add_sample_abs(acc, site, params)
        return
    for name, g in rule.batch_grads(acc, site, params).items():  # the same gradient for each of the n samples
        acc.add_sum(params[name], g.abs() * n)


def _reduce_hebbian(acc: Any, sites: list[Site], plan: Plan, n: int) -> None:
    """Linear/Conv rules: co-activation events per call. Every other parameter takes the ``sample`` statistic
    (per-sample gradients summed over its calls before |·|), averaged over all samples of the pass."""
    calls: dict[int, int] = {}
    for s in sites:
        for rule, params in plan.sites[id(s.module)].groups:
            if rule.hebbian:  # a call shared by the batch is each sample's: its events count once per sample
                rule.add_hebbian(acc, s if s.batched or n == 1 else replicated(s, n), params)
                continue
            for p in params.values():
                calls[id(p)] = calls.get(id(p), 0) + 1
                acc.stats.sampled.add(acc.names[id(p)])
    shared = {pid for pid, k in calls.items() if k > 1}
    for s in sites:
        if not _has_delta(s):
            continue
        for rule, params in plan.sites[id(s.module)].groups:
            own = {k: p for k, p in params.items() if id(p) in calls and id(p) not in shared}
            if not rule.hebbian and own:
                add_sample_abs(acc, rule, s, own, n)
    if shared:
        _shared_sample(acc, sites, plan, n, shared)


def _reduce_sample(acc: Any, sites: list[Site], plan: Plan, n: int, shared: set[int]) -> None:
    for s in sites:
        if not _has_delta(s):
            continue
        for rule, params in plan.sites[id(s.module)].groups:
            own = {k: p for k, p in params.items() if id(p) not in shared}
            if own:
                add_sample_abs(acc, rule, s, own, n)
    if shared:
        _shared_sample(acc, sites, plan, n, shared)
    acc.stats.count_all(n)


def _shared_sample(acc: Any, sites: list[Site], plan: Plan, n: int, shared: set[int]) -> None:
    """Per-sample gradients of parameters computed at several calls, summed over the calls, then |·|.

    A parameter whose rules all write row blocks (``Rule.row_blocks``: Linear, Embedding; a tied embedding
    and head) is done block of rows by block of rows, so its per-sample buffer stays within
    ``chunk_bytes / 8`` however large the vocabulary; the others take all their rows at once.
    """
    calls: dict[int, list[tuple[Site, Any, str]]] = {pid: [] for pid in shared}
    for s in sites:
        if not _has_delta(s):
            continue
        for rule, params in plan.sites[id(s.module)].groups:
            for name, p in params.items():
                if id(p) in shared:
                    calls[id(p)].append((s, rule, name))
    by_rows = {
        pid
        for pid, where in calls.items()
        if type(acc.stats) is Statistics  # sharded statistics keep their own buffers
        and acc.params[acc.names[pid]].dim() >= 2
        and all(getattr(rule, "row_blocks", False) for _, rule, _ in where)
    }
    for pid in by_rows:
        _shared_rows(acc, acc.params[acc.names[pid]], calls[pid], n)
    if shared - by_rows:
        _shared_whole(acc, sites, plan, n, shared - by_rows)


def row_budget(acc: Any, p: Tensor) -> tuple[torch.dtype, int, int]:
    """(dtype, bytes of one row, scratch budget) for per-sample work on ``p`` block of rows by block
    (``Rule.row_blocks``): its sums' dtype, and ``chunk_bytes / 8`` but at least one row."""
    dtype = sum_dtype(p)
    row_bytes = max(1, p[0].numel()) * torch.empty((), dtype=dtype).element_size()
    return dtype, row_bytes, max(row_bytes, acc.chunk_bytes // 8)


class BlockScratch:
    """One buffer for the blocks of rows of a pass over a parameter, zeroed for each block. A fresh allocation of
    a block (tens of MiB) goes to the kernel every time on the CPU (glibc's mmap threshold is at most 32 MiB),
    and its page faults cost several times the zeroing of a buffer already touched."""

    def __init__(self, p: Tensor, dtype: torch.dtype, most: int) -> None:
        self.flat = torch.empty(most, dtype=dtype, device=p.device)

    def zeros(self, *shape: int) -> Tensor:
        numel = 1
        for size in shape:
            numel *= size
        return self.flat[:numel].view(shape).zero_()


def _shared_rows(acc: Any, p: Tensor, calls: list[tuple[Site, Any, str]], n: int) -> None:
    dtype, row_bytes, budget = row_budget(acc, p)
    per_sample = row_bytes * p.shape[0]
    samples = max(1, min(n, budget // per_sample))  # as many samples as fit with all rows
    block = p.shape[0] if samples > 1 else max(1, min(p.shape[0], budget // row_bytes))
    total_sum = acc.sum_of(p)
    scratch = BlockScratch(p, dtype, samples * block * max(1, p[0].numel()))
    for start in range(0, n, samples):
        rows = slice(start, min(n, start + samples))
        for lo in range(0, p.shape[0], block):
            blk = slice(lo, min(p.shape[0], lo + block))
            total = scratch.zeros(rows.stop - rows.start, blk.stop - blk.start, *p.shape[1:])
            for s, rule, name in calls:
                if s.batched:
                    rule.add_per_sample_grads(acc, s, {name: p}, rows, {name: total}, block=blk)
                else:  # shared by the batch: one gradient, every sample's
                    total.add_(rule.batch_grads(acc, s, {name: p})[name][blk].unsqueeze(0))
            for row in total.abs_():  # sample by sample: no second buffer of the block's size
                total_sum[blk].add_(row)


def _shared_whole(acc: Any, sites: list[Site], plan: Plan, n: int, shared: set[int]) -> None:
    numel = sum(acc.params[acc.names[pid]].numel() for pid in shared)
    for rows in acc.chunks(n, bytes_per_sample=8 * numel):
        k = rows.stop - rows.start
        total: dict[int, Tensor] = {}
        for s in sites:
            if not _has_delta(s):
                continue
            for rule, params in plan.sites[id(s.module)].groups:
                mine = {name: p for name, p in params.items() if id(p) in shared}
                if not mine:
                    continue
                into = {}
                for name, p in mine.items():
                    if id(p) not in total:
                        total[id(p)] = torch.zeros(k, *p.shape, dtype=sum_dtype(p), device=p.device)
                    into[name] = total[id(p)]
                if s.batched:
                    rule.add_per_sample_grads(acc, s, mine, rows, into)
                else:  # shared by the batch: one gradient, every sample's
                    for name, g in rule.batch_grads(acc, s, mine).items():
                        into[name].add_(g.unsqueeze(0))
        for pid, g in total.items():
            into = acc.sum_of(acc.params[acc.names[pid]])
            for row in g.abs_():  # sample by sample: no second buffer of the parameter's size
                into.add_(row.to(into.dtype))
