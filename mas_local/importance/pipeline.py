"""One batch through its plan: capture → Δ → checks → statistics (``docs/math.md``; the Estimator's steps).

:func:`run_through_sites` runs the planned forward (streamed in local mode, :mod:`.streaming`), handles the
reruns a batch may need (shared calls that cannot be expanded, in-place changes of captured tensors, a stream
that must be taken back) and hands the captured calls to :func:`reduce_captured`, which checks the
parameters' reads, gets Δ, runs the self-check when due and reduces the calls into the statistics.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from ..errors import ImportanceError, LayoutError
from .backward_stream import can_stream_backward, stream_global
from .capture import Capture, Site
from .guards import check_output
from .planning import RidingProbe, Unplanned, refuse_unreachable
from .reduction import reduce_sites
from .signature import ReadCounter, read_counts
from .statistics import Statistics
from .streaming import Streamer, can_stream, undo
from .verify import StreamCheck, verify_batch


class Replan(Exception):
    """Internal: a batch reads the parameters elsewhere than the batch its plan was made on."""


def forward(
    est, batch: Any, n: int, consume: Callable[[Site], bool] | None = None, ride: Any = None
) -> tuple[Tensor, list[Site]]:
    """The planned forward (``ride``: a :class:`~.planning.RidingProbe` watching it, entered after the capture
    so that the probe's pre-hooks run first and its forward hooks last)."""
    cap = Capture(
        est.model,
        est.plan.modules,
        n,
        positions=est._positions,
        clone_modules=est._clone_modules,
        alias=est.mode == "global",
        shared_leaves=est.plan.shared_leaves,
        expand=est.plan.expand,
        layout_modules=est._layout_modules,
        on_site=est._on_site,
        names=est.module_names,
        consume=consume,
    )
    counter = ReadCounter(est.names) if est.mode == "local" and not est.sharded else nullcontext()
    est.read_counter = counter if isinstance(counter, ReadCounter) else None
    with cap, counter, ride if ride is not None else nullcontext():
        out = est.output_fn(est._call(batch))
    est._local_reads = getattr(counter, "counts", None)
    check_output(out, n)
    return out, cap.sites


def same_output(est, out: Tensor) -> bool:
    ref = est._probe_out
    if out.shape != ref.shape:
        return False
    lo, hi = ref.aminmax() if ref.numel() else (ref.new_zeros(()), ref.new_zeros(()))
    scale = max(-float(lo), float(hi))  # max |ref| without a temporary of ref's size
    a, b = out.detach().reshape(-1), ref.reshape(-1)
    step = 1 << 22  # in slices: allclose makes several temporaries the size of its inputs (a model's logits)
    return all(
        bool(torch.allclose(a[i : i + step], b[i : i + step], rtol=1e-5, atol=1e-6 * scale))
        for i in range(0, a.numel(), step)
    )


def needs_samples(est, rule, site: Site) -> bool:
    if est.mode == "local" and not site.batched:  # a call shared by the batch: one event for every sample
        return False
    return est.estimator == "sample" or (est.estimator == "hebbian" and not rule.hebbian)


def check_ahead(est, batch: Any, n: int) -> StreamCheck | None:
    """Global ``sample``: the self-check's independent sums, computed before the batch's forward when the check
    will be due and the batch can stream through the backward (``backward_stream``), so that the oracle's
    autograd pass never overlaps the batch's graph. Only while nothing is accumulated: a failed check then
    undoes the batch by emptying the statistics."""
    if est.mode != "global" or not can_stream_backward(est) or est.config.verify == "off" or est.stats.sums:
        return None
    if est.config.verify == "first" and est.book.checked_any(est._signature):
        return None
    try:
        return StreamCheck(est, batch, n, est._mask)
    except Exception:  # a batch the model cannot run: the batch's own forward says so, with the pass's errors
        return None


def _streamer(est, batch: Any, n: int, calls: Any, ride: RidingProbe | None = None) -> Streamer:
    """A streamer for this batch, and its self-check when one is due (run as it streams)."""
    streamer = Streamer(est, calls, ride)
    verify, key = est.config.verify, est._signature
    if verify == "every" or (verify == "first" and not est.book.checked_any(key)):
        streamer.check = StreamCheck(est, batch, n, est._mask)
    return streamer


def run_through_sites(est, batch: Any, n: int, ride: RidingProbe | None = None) -> None:
    """One batch through its plan; ``ride``: a local first batch streaming on a guessed plan, which the probe
    riding along confirms (else the batch runs again on the plan the probe saw)."""
    key = est._signature
    streamer = None
    if ride is not None:
        try:
            streamer = _streamer(est, batch, n, ride.guessed_calls, ride)
        except Exception as failed:  # the guessed plan's self-check could not run: plan by a forward of its own
            raise Unplanned from failed
    elif can_stream(est, key):
        streamer = _streamer(est, batch, n, est.book.calls(key))
    # a rerun when the guessed plan does not hold, when shared calls cannot be expanded, when in-place changes
    # show, when streaming fails
    for _ in range(5):
        grad_ctx = torch.enable_grad() if est.mode == "global" else torch.no_grad()
        with grad_ctx:
            try:
                out, sites = est._forward(batch, n, consume=streamer, ride=ride)
            except Exception as failed:
                if streamer is not None:
                    undo(est, batch, n, streamer)
                if ride is not None:
                    raise Unplanned from failed
                if est._probe_out is None:
                    raise
                # the model tiles a shared output itself (.repeat, a broadcast against [B·nW, ...]): an
                # expanded call does not fit it, so the shared calls' parameters go to enclosing calls
                out = None
            if est._probe_out is not None and (out is None or not same_output(est, out)):
                est.notice_once("expand", "expanding shared calls changes this model's output; not expanding")
                est.plan, est._probe_out = est._probe.plan(est.params, expand=False), None
                continue
            if ride is not None:
                seen, ride_calls = ride.seen_plan(streamer.all_hebbian), ride.calls
                ride = streamer.ride = None
                if seen is not None:  # the guess did not hold: take its calls back, run on the plan seen
                    undo(est, batch, n, streamer)
                    refuse_unreachable(est, seen)
                    est.plan = seen
                    est.book.note_calls(key, ride_calls)
                    streamer = _streamer(est, batch, n, ride_calls) if can_stream(est, key) else None
                    continue
                est.book.note_calls(key, ride_calls)
            est._probe = est._probe_out = None
            # Decided once per pass: modules whose captured tensors the model changes in place (a ReLU with
            # inplace=True after them) are captured as copies from then on; only that batch runs twice.
            changed = {(id(s.module), part) for s in sites for part in s.changed_parts()}
            if streamer is not None and (changed or not streamer.holds(key)):
                undo(est, batch, n, streamer)  # and run the batch with every call kept
                streamer = None
                if not changed:
                    continue
            if changed:
                if changed <= est._clone_modules:
                    raise ImportanceError("captured tensors changed in place even on copies")
                est._clone_modules |= changed
                est.notice_once(
                    "inplace",
                    "a layer input or output is modified in place (e.g. ReLU(inplace=True)); "
                    "capturing copies of it for the rest of the pass",
                )
                continue
        try:
            est._reduce_captured(out, sites, batch, streamer=streamer)
        except BaseException:
            if streamer is not None:
                undo(est, batch, n, streamer)
            raise
        return
    raise ImportanceError("captured tensors changed in place even on copies")


def reduce_captured(est, out: Tensor, sites: list[Site], batch: Any = None, streamer: Any = None) -> None:
    """Δ of the captured calls, checks, and the statistics of one batch (``streamer``: ``sites`` are the
    calls a streamed forward kept; the others were reduced as they returned)."""
    streamed = streamer is not None
    key = est._signature
    counts = None
    if est.mode == "global" and key is not None and not est.sharded:
        counts = read_counts(out)
    elif est.mode == "local" and key is not None:
        counts = est._local_reads
    if counts is not None:
        if not est.book.same_reads(key, counts):
            est.book.forget(key)
            if est._replanned:
                raise ImportanceError("the parameters' reads change between two runs of the same batch")
            raise Replan
    if est.estimator != "batch" and est.batch_samples > 1:
        for s in sites:
            if est.plan.rows_unfollowed(id(s.module), s.batched):
                raise LayoutError(
                    f"module '{s.path}' ({type(s.module).__name__}) gets rows computed from the batch whose "
                    "samples its tensors' sizes do not show (gathered tokens, windows or heads folded into the "
                    "batch)"
                )
    layouts = (key, tuple(s.layout for s in sites))
    verify_due = (
        not streamed
        and batch is not None
        and est.config.verify != "off"
        and est.estimator != "batch"
        and not est.sharded
        and (est.config.verify == "every" or est.book.needs_check(layouts))
    )
    check = est._check_ahead if verify_due else None  # its independent sums were computed before the forward
    est._check_ahead = None
    scratch = None
    if not verify_due and not est.sharded and est.stats.sums and key is not None and not est.book.reduced(key):
        # an unchecked first batch of a signature, later in a pass: reduced into sums of its own, added once
        # every rule ran, so that a rule that cannot follow its layout leaves nothing to take back
        scratch = Statistics(est.params, est.stats.fingerprint)
        est.acc.stats = scratch
    writes = est.stats.writes
    try:
        _deltas_and_statistics(est, out, sites, batch, streamer, layouts, verify_due, check)
    except Exception as failed:
        if est.stats.writes != writes:  # a rule or the check failed after part of the batch was added
            undo_partial(est, failed, streamer)
        raise
    finally:
        est.acc.stats = est.stats
    if scratch is not None:
        est.stats.merge(scratch)
    if key is not None:
        est.book.note_reduced(key)


def undo_partial(est, failed: Exception, streamer: Any) -> None:
    """Take back a batch that failed after part of it was added to the statistics (a rule that cannot follow
    a layout, after other calls were reduced during the backward or before it): possible when nothing was
    accumulated before the batch (the statistics are emptied); otherwise (a signature whose batches went
    through every rule before) refused, never counted twice."""
    if est._fresh is None:
        raise ImportanceError(
            f"a batch failed after part of it was added to the importance ({type(failed).__name__}: {failed}); "
            "the statistics cannot be restored. With verify='first' (the default) the first batch of each batch "
            "signature is checked before anything is added"
        ) from failed
    est.stats.restart(est._fresh)
    if streamer is not None:  # its streamed calls went with the rest
        streamer.streamed.clear()


def _deltas_and_statistics(
    est, out: Tensor, sites: list[Site], batch: Any, streamer: Any, layouts: tuple, verify_due: bool, check: Any
) -> None:
    """Δ of the captured calls (global ``sample``: through the backward, streamed when it can), the self-check,
    and the statistics of one batch."""
    key = layouts[0]
    grad_ctx = torch.enable_grad() if est.mode == "global" else torch.no_grad()
    with grad_ctx:
        if est.mode == "local":
            est._local_deltas(sites)
        for s in sites:
            for rule, _ in est.plan.sites[id(s.module)].groups:
                rule.check(est.acc, s, est._needs_samples(rule, s))
        if est.mode == "global":
            # A streamed batch adds to Ω during the backward, before its other calls are reduced; a rule that
            # fails after that (a layout it cannot follow) or a failed self-check must be undone, which is
            # possible while nothing was accumulated before the batch (undo_partial); otherwise only a
            # signature whose batches already went through every rule streams.
            streams = (
                can_stream_backward(est)
                and (not verify_due or check is not None)
                and (not est.stats.sums or key is None or est.book.reduced(key))
            )
            kept = stream_global(est, out, sites, check) if streams else None
            if kept is None:
                est._global_deltas(out, sites)
            else:  # the other calls were reduced during the backward (mas_local.importance.backward_stream)
                sites = kept
    if streamer is None and key is not None and est.mode == "local":
        est.book.note_calls(key, Counter(id(s.module) for s in sites))
    if streamer is not None and streamer.check is not None:  # the streamed calls were added as they returned
        streamer.check.add(sites)
        streamer.check.finish()
        est.book.checked((key, tuple(streamer.layouts)))
    if check is not None:  # the calls reduced during the backward were added there
        check.add(sites)
        check.finish()
        est.book.checked(layouts)
    elif verify_due:
        verify_batch(est, batch, sites, est.batch_samples, est._mask)
        est.book.checked(layouts)
    # The forward may run under autocast (bf16 activations); the statistics are computed in fp32.
    # no autograd history for the statistics (the generic rule's torch.func transforms ignore no_grad)
    with torch.autocast(est._device_type, enabled=False), torch.no_grad():
        reduce_sites(est.acc, sites, est.plan)
