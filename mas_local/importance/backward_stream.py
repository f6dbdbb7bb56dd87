"""Global mode, ``estimator="sample"``, streamed through the backward: each call is reduced as soon as its Δ is
complete, and that Δ is dropped, so that a global pass needs about the memory of a training step.

Without streaming, one ``autograd.grad`` returns the Δ of every captured output at once, and the batch is
reduced after that. Here the backward is asked for the gradients of the first calls' outputs only (the
embedding's), and a hook on each captured output receives its Δ while the backward passes through it. A call
is reduced inside that hook, once all its outputs' Δ arrived, when

- no other call of the batch computes any of its parameters (per-sample gradients of a parameter read at
  several calls, a tied embedding and head, are summed over the calls before |·|), and
- its rule does not re-run the module (``Rule.reruns_module``: the generic rule's ``vmap`` would start an
  autograd pass inside the backward).

The other calls keep their Δ and are reduced with the batch, as without streaming. A sharded model and a batch
where some parameter is read outside the captured calls (refused after the backward) take the unstreamed path,
so an error never follows a partial reduction. A batch whose self-check is due streams only when its independent
sums were computed before its forward and nothing was accumulated yet (the first batch of a pass,
``pipeline.check_ahead``): each call's share of the engine's sums is added before its Δ is dropped, and a failed
check empties the statistics again.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor

from .capture import Site
from .masks import masked_squared_norm
from .reduction import add_sample_abs


def can_stream_backward(est: Any) -> bool:
    return est.mode == "global" and est.estimator == "sample" and est.config.stream and not est.sharded


def _drivers(sites: list[Site]) -> list[Tensor]:
    """The captured outputs whose gradients the backward is asked for: the fewest (in call order) such that
    every captured output has one of them below it in the graph, or is one, so that the backward passes
    through all of them. Usually the first call's output alone (an embedding's); a branch of the model no
    earlier output feeds (an encoder beside a decoder) adds its own first output."""
    drivers: list[Tensor] = []
    below: dict[Any, bool] = {}  # autograd node -> a driver is at or below it

    def reaches(node: Any) -> bool:
        stack = [node]
        while stack:  # iterative post-order walk with memo: graphs are deep
            top = stack[-1]
            if top in below:
                stack.pop()
                continue
            todo = [nxt for nxt, _ in top.next_functions if nxt is not None and nxt not in below]
            if todo:
                stack.extend(todo)
                continue
            below[top] = any(below[nxt] for nxt, _ in top.next_functions if nxt is not None)
            stack.pop()
        return below[node]

    for s in sites:  # call order: a later output is never below an earlier one
        for t in s.targets:
            if not t.requires_grad:
                continue
            if t.grad_fn is None or not reaches(t.grad_fn):
                drivers.append(t)
                if t.grad_fn is not None:
                    below[t.grad_fn] = True
    return drivers


def _covered(est: Any, sites: list[Site]) -> set[int]:
    return {id(p) for s in sites for _, params in est.plan.sites[id(s.module)].groups for p in params.values()}


def stream_global(est: Any, out: Tensor, sites: list[Site], check: Any = None) -> list[Site] | None:
    """Δ by one backward, reducing the calls that stream as their Δ arrives (each added to ``check``, a
    ``verify.StreamCheck``, first); returns the calls kept (with their Δ) for the batch reduction, or ``None``
    when this batch does not stream (then nothing was done)."""
    covered = _covered(est, sites)
    if any(id(p) not in covered for p in est.params.values()):
        return None  # global_deltas checks where those parameters are read, and refuses before any reduction
    loss = masked_squared_norm(out, est._mask)
    if not loss.requires_grad:
        return None
    plan, acc, n = est.plan, est.acc, est.batch_samples
    reads = Counter(id(p) for s in sites for _, params in plan.sites[id(s.module)].groups for p in params.values())

    def streams(s: Site) -> bool:
        groups = plan.sites[id(s.module)].groups
        return not any(rule.reruns_module for rule, _ in groups) and all(
            reads[id(p)] == 1 for _, params in groups for p in params.values()
        )

    kept: list[Site] = []
    waiting: dict[int, int] = {}  # id(site) -> outputs whose Δ has not arrived
    handles = []

    def reduce_now(s: Site) -> None:
        if check is not None:
            check.add([s])
        if any(d is not None for d in s.deltas):
            # the statistics in fp32 and without autograd history, as in the batch reduction
            with torch.autocast(est._device_type, enabled=False), torch.no_grad():
                for rule, params in plan.sites[id(s.module)].groups:
                    add_sample_abs(acc, rule, s, params, n)
        s.deltas = [None] * len(s.targets)

    def on_delta(s: Site, i: int):
        def hook(grad: Tensor) -> None:
            s.deltas[i] = grad
            waiting[id(s)] -= 1
            if waiting[id(s)] == 0 and streams(s):
                reduce_now(s)

        return hook

    for s in sites:
        for _, params in plan.sites[id(s.module)].groups:
            for p in params.values():
                acc.stats.seen.add(acc.names[id(p)])
        s.deltas = [None] * len(s.targets)
        live = [i for i, t in enumerate(s.targets) if t.requires_grad]
        waiting[id(s)] = len(live)
        for i in live:
            handles.append(s.targets[i].register_hook(on_delta(s, i)))
        if not streams(s):
            kept.append(s)
    drivers = _drivers(sites)
    if not drivers:  # no captured output carries a gradient: the unstreamed path says what is wrong
        for h in handles:
            h.remove()
        return None
    try:
        # asked for the gradients of a few captured outputs only (_drivers), the backward still passes
        # through every other one, whose hooks then fire; no parameter gradient is computed
        torch.autograd.grad(loss, drivers, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    kept_ids = {id(s) for s in kept}
    for s in sites:  # outputs no gradient reached: the call is reduced with the Δ it has
        if id(s) not in kept_ids and waiting[id(s)] > 0:
            reduce_now(s)
    return kept
