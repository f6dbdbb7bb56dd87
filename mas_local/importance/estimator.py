"""One importance pass: capture the module calls of each batch, get their Δ, reduce them into statistics.

The definitions are in ``docs/math.md``. Per batch:

1. The batch's signature (:mod:`.signature`) selects its plan; the first batch of a signature makes one
   (:mod:`.planning`, :mod:`.plan`: where each parameter is read, so which module call computes it).
2. A forward pass with the planned modules captured (:mod:`.capture`); in local mode each call is reduced
   as it returns (:mod:`.streaming`).
3. Δ of every captured output: ∂(Σ_k‖f(x_k)‖²)/∂y by one ``autograd.grad`` (global) or
   the output itself (local: ∂(½‖y‖²)/∂y = y); the self-check when due (:mod:`.verify`).
4. :mod:`.reduction` turns the calls into sums and counts (:mod:`.statistics`) with the
   per-layer rules (:mod:`.rules`), which see only an :class:`~.accumulator.Accumulator`.

Steps 2-4 are :mod:`.pipeline`; the paths a batch takes when its calls cannot be followed (each sample
alone) are :mod:`.fallbacks`. Global ``batch`` skips all that: one ``autograd.grad`` of the batch's
Σ_k‖f(x_k)‖².
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..config import DEFAULT_CHUNK_BYTES, Activation, ImportanceConfig
from ..distributed.fsdp import full_params, is_dtensor, reshard
from ..errors import ImportanceError, LayoutError
from .accumulator import Accumulator
from .activations import resolve_activations
from .batches import (
    batch_size,
    call_model,
    check_batch,
    default_output_fn,
    position_mask,
    sequence_length,
    slice_batch,
)
from .capture import Site
from .deltas import global_deltas, local_deltas
from .fallbacks import global_batch, refusal, update_alone
from .guards import (
    check_checkpointing,
    preserved_buffers,
    without_kv_cache,
)
from .layouts import is_sequence_first
from .pipeline import Replan, check_ahead, forward, needs_samples, reduce_captured, run_through_sites
from .plan import Plan
from .planning import RidingProbe, Unplanned, first_batch, make_plan
from .signature import PlanBook, ReadCounter, batch_signature
from .statistics import Statistics
from .streaming import streams_first_batch
from .verify import VerificationFailed

log = logging.getLogger("mas_local")


class Estimator:
    """Accumulates the statistics of one importance pass: ``update(batch)`` per batch, then ``result()``.

    Rules (:mod:`mas_local.importance.rules`) see only its :class:`~.accumulator.Accumulator` (``self.acc``).
    """

    # global batch: one autograd.grad w.r.t. the parameters (False: through the per-module rules)
    batch_by_autograd = True

    def __init__(
        self,
        model: nn.Module,
        mode: str = "global",
        estimator: str | None = None,
        output_fn: Callable[[Any], Tensor] | None = None,
        backend: str = "auto",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        activation: Activation = None,
        precision: str = "accurate",
        *,
        config: ImportanceConfig | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if config is None:
            config = ImportanceConfig(
                mode=mode,
                estimator=estimator,
                output_fn=output_fn,
                backend=backend,
                chunk_bytes=chunk_bytes,
                activation=activation,
                precision=precision,
            )
        if is_sequence_first(model):
            raise ImportanceError(
                f"the model ({type(model).__name__}) takes sequence-first [T, B, ...] input (batch_first=False), "
                "but data batches are batch-first; wrap it so that it takes [B, T, ...] (transpose inside the "
                "wrapper), or build it with batch_first=True"
            )
        self.config = config
        self.model = model
        self.activation_of = resolve_activations(model, config.activation)
        reshard(model)  # FSDP2: the registered parameters are the sharded ones
        self.output_fn = config.output_fn or default_output_fn
        self.params: dict[str, nn.Parameter] = {}
        self.frozen: list[str] = []
        for name, p in model.named_parameters():  # lists a tied parameter once
            (self.params.__setitem__(name, p) if p.requires_grad else self.frozen.append(name))
        if not self.params:
            raise ImportanceError("the model has no trainable parameters (all have requires_grad=False)")
        self.names = {id(p): name for name, p in self.params.items()}
        self.sharded = any(is_dtensor(p) for p in self.params.values())
        self.stats = self.make_statistics()
        self.acc = Accumulator(config, self.stats)
        self.plan: Plan | None = None  # the plan of the current batch's signature
        self.book = PlanBook()  # plans per batch signature (docs/math.md, "Which rows belong to which sample")
        self._signature: tuple | None = None
        self._replanned = False
        self._local_reads: dict[int, int] | None = None  # local mode: the last forward's parameter reads
        self.read_counter: ReadCounter | None = None  # the one counting during the current forward
        self.verify_generator = torch.Generator().manual_seed(0)
        self.module_names = {id(m): name or "<model>" for name, m in model.named_modules(remove_duplicate=False)}
        self._mask: Tensor | None = None
        self._positions: int | None = None
        self._device_type = next(iter(self.params.values())).device.type
        # (id(module), "inputs" | "outputs"): captured tensors the model modifies in place, captured as copies
        self._clone_modules: set[tuple[int, str]] = set()
        self._probe = self._probe_out = None  # the first batch's probe and output, until expansion is verified
        self._check_ahead: Any = None  # global: a self-check whose oracle ran before the batch (pipeline.check_ahead)
        # counts before the batch when nothing was accumulated yet (pipeline.undo_partial), else None
        self._fresh: dict[str, int] | None = None
        self._any_training: bool | None = None
        every = list(model.parameters())
        self._param_devices = {p.device for p in every}
        self._param_dtypes = {p.dtype for p in every if p.is_floating_point()}
        self._layout_modules = [m for m in model.modules() if is_sequence_first(m)]

    # -- settings seen by rules and callers ----------------------------------------
    mode = property(lambda self: self.config.mode)
    estimator = property(lambda self: self.config.estimator)
    backend = property(lambda self: self.config.backend)
    precision = property(lambda self: self.config.precision)
    chunk_bytes = property(lambda self: self.config.chunk_bytes)

    def fingerprint(self) -> dict[str, Any]:
        """What a partial pass depends on: settings and the trainable parameters' names, shapes, dtypes."""
        return {
            "mode": self.mode,
            "estimator": self.estimator,
            "params": [[name, list(p.shape), str(p.dtype).replace("torch.", "")] for name, p in self.params.items()],
        }

    def make_statistics(self) -> Statistics:
        return Statistics(self.params, self.fingerprint())

    # what the rules see (a narrow interface, mas_local.importance.accumulator)
    @property
    def batch_samples(self) -> int:
        return self.acc.batch_samples

    @batch_samples.setter
    def batch_samples(self, n: int) -> None:
        self.acc.batch_samples = n

    def notice_once(self, key, msg: str, *args) -> None:
        self.acc.notice_once(key, msg, *args)

    # -- statistics (kept here for callers: checkpoints, distributed sync) ------------------
    batches = property(lambda self: self.stats.batches)
    samples = property(lambda self: self.stats.samples)

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def load_state_dict(self, state) -> None:
        self.stats.load_state_dict(state)

    def result(self, release: bool = False) -> dict[str, Tensor]:
        """Ω per parameter name (float32, or float64 for float64 parameters; detached). ``release``: the pass
        is over; Ω is made in the accumulators themselves (see :meth:`Statistics.result`)."""
        return self.stats.result(covers_all=self.mode == "global" and self.estimator == "batch", release=release)

    # -- one batch ----------------------------------------------------------------------
    def update(self, batch: Any) -> None:
        """Add one batch to the statistics. An error leaves the model and its buffers untouched."""
        check_batch(batch, self.stats.batches, self._param_devices, self._param_dtypes)
        if self._any_training is None:  # module modes do not change during a pass (run_pass sets them)
            check_checkpointing(self.model)
            self._any_training = any(m.training for m in self.model.modules())
        n = batch_size(batch)
        step = self.config.micro_batch
        # in train mode a forward updates buffers (BatchNorm statistics): a failed batch restores them
        guard = preserved_buffers(self.model) if self._any_training else nullcontext()
        with guard, without_kv_cache(self.model):
            if step is None or n <= step:
                self._update_one(batch, n)
            else:  # per-sample statistics add up over any split of the batch: bounded activation memory
                for start in range(0, n, step):
                    stop = min(n, start + step)
                    self._update_one(slice_batch(batch, start, stop, n), stop - start)
        self.stats.samples += n
        self.stats.batches += 1

    def update_piece(self, batch: Any, n: int) -> None:
        """One batch, or one piece of it (micro-batches, samples run alone), into the statistics."""
        self._update_one(batch, n)

    def _update_one(self, batch: Any, n: int) -> None:
        self.batch_samples = n
        self._mask = position_mask(self.config.mask, batch, n)
        self._positions = sequence_length(batch, self._mask)
        if self.mode == "global" and self.estimator == "batch" and self.batch_by_autograd:
            global_batch(self, batch, n)
            return
        key = self._signature = batch_signature(batch, n, self._positions)
        if key in self.book.alone:
            update_alone(self, batch, n)
            return
        try:
            try:
                self._update_planned(batch, n, key)
            except Replan:  # this batch reads parameters where the plan's batch did not
                self.book.forget(key)
                self._update_planned(batch, n, key, replanned=True)
        except (VerificationFailed, LayoutError) as failed:
            if n == 1:
                raise (refusal(self, failed) if isinstance(failed, VerificationFailed) else failed) from None
            self.book.alone.add(key)
            what = ", ".join(failed.mismatches) if isinstance(failed, VerificationFailed) else str(failed)
            self.notice_once(
                ("alone", key),
                "the samples of a batch cannot be told apart at every call (%s); batches of this signature are "
                "computed one sample at a time (exact, slower)",
                what,
            )
            update_alone(self, batch, n)

    def _update_planned(self, batch: Any, n: int, key: tuple, replanned: bool = False) -> None:
        self._replanned = replanned
        self.plan = self.book.plan(key)
        self._fresh = dict(self.stats.counts) if not self.stats.sums else None
        self._check_ahead = check_ahead(self, batch, n)
        try:
            if self.plan is None and streams_first_batch(self):
                self._stream_first_batch(batch, n)
            elif self.plan is None and not self.sharded and not self._any_training:
                first_batch(self, batch, n)
            else:
                if self.plan is None:
                    self.plan = make_plan(self, batch, n)
                self._update_through_sites(batch, n)
        finally:
            self._check_ahead = None
        self.book.keep(key, self.plan)

    def _stream_first_batch(self, batch: Any, n: int) -> None:
        """Local mode: stream on the guessed plan with the usage probe riding along (no forward of its own);
        when that cannot finish, plan by a forward of its own and stream (``planning``)."""
        ride = RidingProbe(self, batch, n)
        self.plan = ride.guess
        try:
            self._update_through_sites(batch, n, ride=ride)
            return
        except Unplanned:
            pass
        self.plan = make_plan(self, batch, n)
        self._update_through_sites(batch, n)

    def site_path_of(self, pid: int) -> str:
        """The module path(s) where the parameter with this id is computed in the current plan."""
        paths = [
            self.module_names.get(mid, type(sp.module).__name__)
            for mid, sp in self.plan.sites.items()
            if any(id(p) == pid for _, params in sp.groups for p in params.values())
        ]
        return ", ".join(paths) or "?"

    def _on_site(self, site: Site) -> None:
        if not self.sharded:
            return
        for rule, params in self.plan.sites[id(site.module)].groups:
            if rule.reruns_module:  # FSDP2 frees the gathered values after the forward
                site.live = full_params(site.module, params)

    def _call(self, batch: Any) -> Any:
        return call_model(self.model, batch, self.config.forward_fn)

    # the batch's steps (mas_local.importance.pipeline)
    _forward = forward
    _needs_samples = needs_samples
    _update_through_sites = run_through_sites
    _reduce_captured = reduce_captured

    def _local_deltas(self, sites: list[Site]) -> None:
        local_deltas(sites, self._mask, self.activation_of)

    def _global_deltas(self, out: Tensor, sites: list[Site]) -> None:
        global_deltas(self, out, sites)
