"""Making a plan for a batch signature: the usage probe (``docs/math.md``, "Where each parameter is computed").

The probe rides along with the batch's own forward where it can, so that planning costs no forward of its own:

- ``RidingProbe``: local mode's streamed first batch streams on the plan that holds for most models (every
  parameter computed by the modules that register it, each module called once) while the probe watches; the
  plan the probe saw confirms it after the forward, or the streamed calls are taken back and the batch runs
  again on that plan (``pipeline.run_through_sites``);
- ``first_batch``: global mode in eval mode, the probe with the capture of the likely sites;
- ``make_plan``: a forward of its own (train mode, FSDP2 — the probe then follows FSDP2's unsharded
  parameters — and a riding probe that could not finish).
"""

from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from ..distributed.fsdp import reshard, unsharded_names
from ..errors import ImportanceError
from .batches import batch_tensors
from .capture import Capture
from .guards import check_output, preserved_state
from .masks import masked_squared_norm
from .plan import Plan, UsageProbe
from .signature import ReadCounter


def make_plan(est, batch: Any, n: int) -> Plan:
    """A plan from a forward of its own (no call kept). Local mode notes how often it called each module:
    what a streamed batch of this signature is held to (:mod:`.streaming`)."""
    probe = UsageProbe(est.model, est.params, n, est._positions, est.mode)
    if est.sharded:  # FSDP2 swaps in unsharded parameter objects during the forward: follow those too
        probe.names.update(unsharded_names(est.model, probe.names))
    grad = torch.enable_grad() if est.mode == "global" else torch.no_grad()
    calls: Counter = Counter()
    counting = register_module_forward_pre_hook(lambda m, args: calls.update((id(m),)))
    try:
        with preserved_state(est.model), grad:
            probe.watch(batch_tensors(batch))  # everything the user passes, whatever forward_fn reads
            with probe:
                out = est.output_fn(est._call(batch))
    finally:
        counting.remove()
    if est.mode == "local" and est._signature is not None:
        est.book.note_calls(est._signature, calls)
    with preserved_state(est.model), grad:
        check_output(out, n)
        if est.mode == "global":
            probe.mark_shared_outputs(masked_squared_norm(out, est._mask))
    if est.sharded:  # the plan names the registered (sharded) parameters, by identity: put them back
        reshard(est.model)
    plan = probe.plan(est.params)
    if plan.expand:  # checked on this batch's capture: expanding must not change the model's output
        est._probe, est._probe_out = probe, out.detach()
    refuse_unreachable(est, plan)
    return plan


class Unplanned(Exception):
    """Internal: a first batch streamed on the guessed plan failed; it is planned by a forward of its own."""


class RidingProbe:
    """The usage probe and a call counter riding along a local first batch that streams on a guessed plan
    (:meth:`UsageProbe.registered_plan`, each planned module called once): see the module docstring."""

    def __init__(self, est, batch: Any, n: int) -> None:
        self.est, self.batch = est, batch
        self.probe = UsageProbe(est.model, est.params, n, est._positions, est.mode)
        self.guess = self.probe.registered_plan(est.params)
        self.guessed_calls = Counter({mid: 1 for mid in self.guess.sites})
        self.calls: Counter = Counter()
        self._counting = None

    def _count(self, module, args) -> None:
        if not self.probe.paused:
            self.calls[id(module)] += 1

    def __enter__(self) -> RidingProbe:
        self.probe.watch(batch_tensors(self.batch))
        self._counting = register_module_forward_pre_hook(self._count)
        self.probe.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.probe.__exit__(*exc)
        finally:
            self._counting.remove()

    def pause(self, paused: bool) -> None:
        """Streaming reduces a call inside the forward: its ops and module re-runs are not the model's."""
        self.probe.paused = paused

    def seen_plan(self, streams_every_call: Any) -> Plan | None:
        """After the forward: ``None`` when the guess holds (the probe's plan assigns every parameter as the
        guess did, and each module called more than once streams all its calls, ``streams_every_call(id)``);
        else the probe's plan, to run the batch again on."""
        plan = self.probe.plan(self.est.params)
        same = plan.assignments() == self.guess.assignments() and not plan.unreachable
        if same and all(k <= 1 or streams_every_call(mid) for mid, k in self.calls.items() if mid in plan.sites):
            return None
        return plan


def refuse_unreachable(est, plan: Plan) -> None:
    if plan.unreachable:
        raise ImportanceError(
            f"no exact {est.mode} '{est.estimator}' importance for {sorted(plan.unreachable)}: they are read "
            "outside any module call of the model that carries the batch (for example in output_fn, or only "
            "in modules whose inputs or outputs are shared by the batch). Use mode='global', estimator='batch' "
            "(one autograd pass over the whole model), or freeze them (requires_grad=False)"
        )


def first_batch(est, batch: Any, n: int) -> None:
    """The first batch in eval mode: the usage probe rides along with the capture of the likely sites (the
    modules that register a trainable parameter), so planning costs no forward of its own. Falls back to a
    planned re-run of the batch when the plan needs another module (a parameter read outside the module
    that registers it), expands shared calls, or the model changes planned captures in place."""
    probe = UsageProbe(est.model, est.params, n, est._positions, est.mode)
    trainable = set(est.names)
    likely = [
        m for m in est.model.modules() if any(id(p) in trainable for p in m._parameters.values() if p is not None)
    ]
    cap = Capture(
        est.model,
        likely,
        n,
        positions=est._positions,
        alias=est.mode == "global",
        layout_modules=est._layout_modules,
        names=est.module_names,
    )
    if est.mode == "local":  # an in-place change of a captured tensor copies it first (no re-run)
        cap.track_writes, probe.before_write = True, cap.copy_on_write
    grad_ctx = torch.enable_grad() if est.mode == "global" else torch.no_grad()
    with grad_ctx:
        probe.watch(batch_tensors(batch))
        counter = ReadCounter(est.names) if est.mode == "local" and not est.sharded else nullcontext()
        with cap, probe, counter:
            out = est.output_fn(est._call(batch))
        est._local_reads = getattr(counter, "counts", None)
        check_output(out, n)
        if est.mode == "global":
            probe.mark_shared_outputs(masked_squared_norm(out, est._mask), retain_graph=True)
    plan = probe.plan(est.params)
    refuse_unreachable(est, plan)
    est.plan = plan
    sites = [s for s in cap.sites if id(s.module) in plan.sites]
    changed = {(id(s.module), part) for s in sites for part in s.changed_parts()}
    copied = {key for key in cap.copied if key[0] in plan.sites}
    if copied:  # copied before the write on this batch; from the next one on, captured as copies
        est._clone_modules |= copied
        est.notice_once("inplace", "a layer input or output is modified in place; capturing copies of it")
    captured = {id(m) for m in likely}
    if plan.expand or changed or any(key not in captured for key in plan.sites):
        est._clone_modules |= changed
        if changed:
            est.notice_once("inplace", "a layer input or output is modified in place; capturing copies of it")
        if plan.expand:
            est._probe, est._probe_out = probe, out.detach()
        # the re-run must not hold this forward's graph and captures alongside its own
        del out, sites, cap
        est._update_through_sites(batch, n)
        return
    for s in sites:
        for i in plan.shared_leaves.get(id(s.module), ()):
            if i < len(s.in_dims):
                s.in_dims[i] = None
    est._reduce_captured(out, sites, batch)
