"""Local mode, streamed: each planned call is reduced as soon as it returns, and what was captured for it is
dropped, so that a local pass needs about the memory of inference whatever the model's depth.

Every batch streams, the first of a signature included: that one streams on a guessed plan while the usage
probe and a call counter ride along (``planning.RidingProbe``; a guess that does not hold is taken back and
the batch runs on the plan seen), and its self-check, when due, runs as it streams (``verify.StreamCheck``:
the samples of the subset alone first, one call at a time, then the engine's sums added call by call). A call
streams when nothing else in the batch has to be seen first:

- its ``sample``-statistic parameters (every parameter under ``estimator="sample"``; those of modules without
  a Hebbian rule under ``"hebbian"``) are read by that call alone: no other planned module computes them (a
  tied embedding and head) and the module was called once on the planning batch (per-sample gradients of a
  parameter read at several calls are summed before |·|);
- its samples can be told apart (a module of the plan's ``unfollowed`` set, given rows computed from the
  batch, goes to the sample-by-sample path).

Other calls are kept and reduced with the batch, as without streaming. Reducing at the call also makes later
in-place changes of its input or output harmless: the statistics have seen the values the module saw.

What is checked after the forward (the parameters' reads, in-place changes of kept calls, a module called
more often than on the planning batch, the self-check's call layouts) can still send the batch to another
path. Its streamed calls are then taken back: the batch runs once more and each streamed call's sums and
counts, computed again into a call-sized scratch, are subtracted (:func:`undo`). In ``eval()`` the forward
is deterministic, so what is subtracted is what was added, up to the sums' rounding; streaming is off for
modules in train mode.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from .capture import Site
from .deltas import local_deltas
from .reduction import reduce_call
from .statistics import Statistics


class Streamer:
    """``Capture``'s ``consume`` callback for one streamed forward (see the module docstring)."""

    def __init__(self, est: Any, calls: Counter, ride: Any = None) -> None:
        self.est, self.calls = est, calls
        self.ride = ride  # the usage probe riding along a first batch (planning.RidingProbe), paused at a call
        # parameters several planned modules compute (a tied embedding and head): summed over calls before |·|
        owners: Counter = Counter()
        for sp in est.plan.sites.values():
            for pid in {id(p) for _, params in sp.groups for p in params.values()}:
                owners[pid] += 1
        self.alone_params = {pid for pid, k in owners.items() if k == 1}
        self.seen: Counter = Counter()
        self.ordinal = -1
        self.streamed: list[int] = []  # ordinals of the calls reduced here
        self.streamed_modules: set[int] = set()
        self.layouts: list[tuple] = []  # (id(module), in_dims, out_dims) of every call, in order
        self.failed: str | None = None  # why the batch must take another path
        self.check: Any = None  # the self-check of this batch (verify.StreamCheck), when one is due

    def all_hebbian(self, mid: int) -> bool:
        """Whether every parameter of the module is judged by co-activation events (each call its own)."""
        est = self.est
        return est.estimator == "hebbian" and all(rule.hebbian for rule, _ in est.plan.sites[mid].groups)

    def _read_once(self, mid: int) -> bool:
        """Whether the module's ``sample``-statistic parameters are read by this one call of the batch."""
        est = self.est
        if self.calls.get(mid, 0) != 1:
            return False
        return all(
            id(p) in self.alone_params
            for rule, params in est.plan.sites[mid].groups
            if not (est.estimator == "hebbian" and rule.hebbian)
            for p in params.values()
        )

    def __call__(self, site: Site) -> bool:
        est = self.est
        mid = id(site.module)
        self.ordinal += 1
        self.seen[mid] += 1
        self.layouts.append(site.layout)
        if self.seen[mid] > 1 and mid in self.streamed_modules and not self.all_hebbian(mid):
            # its per-sample gradients should have been summed with this call's before |·|
            self.failed = f"module '{site.path}' was called more often than on the planning batch"
        if self.failed is not None or not (self.all_hebbian(mid) or self._read_once(mid)):
            return False
        if est.batch_samples > 1 and est.plan.rows_unfollowed(mid, site.batched):
            self.failed = f"module '{site.path}' gets rows whose samples cannot be told apart"
            return False
        counter, ride = est.read_counter, self.ride
        if counter is not None:
            counter.paused = True
        if ride is not None:
            ride.pause(True)
        try:
            local_deltas([site], est._mask, est.activation_of)
            for rule, _ in est.plan.sites[mid].groups:
                rule.check(est.acc, site, est._needs_samples(rule, site))
            with torch.autocast(est._device_type, enabled=False), torch.no_grad():
                reduce_call(est.acc, site, est.plan)
            if self.check is not None:
                self.check.add([site])
        finally:
            if counter is not None:
                counter.paused = False
            if ride is not None:
                ride.pause(False)
        self.streamed.append(self.ordinal)
        self.streamed_modules.add(mid)
        return True

    def holds(self, key: tuple) -> bool:
        """After the forward: whether the streamed calls stand (else :func:`undo` them and take another path)."""
        cfg = self.est.config
        if self.failed is not None:
            return False
        if self.check is not None:  # checked as it streamed: compared with the kept calls' sums
            return True
        return cfg.verify == "off" or not self.est.book.needs_check((key, tuple(self.layouts)))


class _Subtract:
    """``consume`` callback of the undo run: the streamed calls' sums and counts, into a scratch, subtracted."""

    def __init__(self, est: Any, ordinals: list[int]) -> None:
        self.est, self.ordinals = est, set(ordinals)
        self.ordinal = -1

    def __call__(self, site: Site) -> bool:
        self.ordinal += 1
        if self.ordinal not in self.ordinals:
            return True  # nothing to take back; nothing kept either
        est = self.est
        main = est.acc.stats
        scratch = Statistics(est.params, main.fingerprint)
        est.acc.stats = scratch
        try:
            local_deltas([site], est._mask, est.activation_of)
            with torch.autocast(est._device_type, enabled=False), torch.no_grad():
                reduce_call(est.acc, site, est.plan)
        finally:
            est.acc.stats = main
        for name, s in scratch.sums.items():
            main.sum_of(est.params[name]).sub_(s)
        for name, c in scratch.counts.items():
            main.counts[name] -= c
        return True


def undo(est: Any, batch: Any, n: int, streamer: Streamer) -> None:
    """Take back the streamed calls of ``streamer``'s forward: run the batch again and subtract them."""
    if not streamer.streamed:
        return
    est._forward(batch, n, consume=_Subtract(est, streamer.streamed))


def streams_first_batch(est: Any) -> bool:
    """Whether the first batch of a signature streams (on a guessed plan, the usage probe riding along)."""
    return (
        est.config.stream
        and est.mode == "local"
        and est.estimator != "batch"  # the signed batch gradient sums every call before |·|
        and not est.sharded
        and not est._any_training
    )


def can_stream(est: Any, key: tuple) -> bool:
    """Whether a batch of signature ``key`` may stream (see the module docstring); a self-check that is due
    runs as it streams (``verify.StreamCheck``)."""
    return streams_first_batch(est) and est._probe_out is None and est.book.calls(key) is not None
