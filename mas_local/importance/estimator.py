"""One importance pass: capture the module calls of each batch, get their Δ, reduce them into statistics.

The definitions are in ``docs/math.md``. Per batch:

1. On the first batch, :mod:`.plan` finds where each parameter is read and so which
   module call computes it (one place per parameter, by identity).
2. A forward pass with the planned modules captured (:mod:`.capture`).
3. Δ of every captured output: ∂(Σ_k‖f(x_k)‖²)/∂y by one ``autograd.grad`` (global) or
   the output itself (local: ∂(½‖y‖²)/∂y = y).
4. :mod:`.reduction` turns the calls into sums and counts (:mod:`.statistics`) with the
   per-layer rules (:mod:`.rules`).

Global ``batch`` skips all that: one ``autograd.grad`` of the batch's Σ_k‖f(x_k)‖².
"""

from __future__ import annotations

import logging
from collections import Counter
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
from .capture import Capture, Site
from .deltas import global_deltas, local_deltas
from .fallbacks import global_batch, refusal, update_alone
from .guards import (
    check_checkpointing,
    check_output,
    preserved_buffers,
    without_kv_cache,
)
from .layouts import is_sequence_first
from .plan import Plan
from .planning import first_batch, make_plan
from .reduction import reduce_sites
from .signature import PlanBook, ReadCounter, batch_signature, read_counts
from .statistics import Statistics
from .streaming import Streamer, can_stream, streams_first_batch, undo
from .verify import StreamCheck, VerificationFailed, verify_batch

log = logging.getLogger("mas_local")


class _Replan(Exception):
    """Internal: a batch reads the parameters elsewhere than the batch its plan was made on (global mode)."""


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

    def result(self) -> dict[str, Tensor]:
        """Ω per parameter name (float32, or float64 for float64 parameters; detached)."""
        return self.stats.result(covers_all=self.mode == "global" and self.estimator == "batch")

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
            except _Replan:  # this batch reads parameters where the plan's batch did not
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
        if self.plan is None and streams_first_batch(self):
            self.plan = make_plan(self, batch, n)  # a forward of its own; the batch then streams
            self._update_through_sites(batch, n)
        elif self.plan is None and not self.sharded and not self._any_training:
            first_batch(self, batch, n)
        else:
            if self.plan is None:
                self.plan = make_plan(self, batch, n)
            self._update_through_sites(batch, n)
        self.book.keep(key, self.plan)

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

    def _forward(self, batch: Any, n: int, consume: Callable[[Site], bool] | None = None) -> tuple[Tensor, list[Site]]:
        cap = Capture(
            self.model,
            self.plan.modules,
            n,
            positions=self._positions,
            clone_modules=self._clone_modules,
            alias=self.mode == "global",
            shared_leaves=self.plan.shared_leaves,
            expand=self.plan.expand,
            layout_modules=self._layout_modules,
            on_site=self._on_site,
            names=self.module_names,
            consume=consume,
        )
        counter = ReadCounter(self.names) if self.mode == "local" and not self.sharded else nullcontext()
        self.read_counter = counter if isinstance(counter, ReadCounter) else None
        with cap, counter:
            out = self.output_fn(self._call(batch))
        self._local_reads = getattr(counter, "counts", None)
        check_output(out, n)
        return out, cap.sites

    def _same_output(self, out: Tensor) -> bool:
        ref = self._probe_out
        if out.shape != ref.shape:
            return False
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return bool(torch.allclose(out.detach(), ref, rtol=1e-5, atol=1e-6 * scale))

    def _needs_samples(self, rule, site: Site) -> bool:
        if self.mode == "local" and not site.batched:  # a call shared by the batch: one event for every sample
            return False
        return self.estimator == "sample" or (self.estimator == "hebbian" and not rule.hebbian)

    def _update_through_sites(self, batch: Any, n: int) -> None:
        key = self._signature
        streamer = Streamer(self, self.book.calls(key)) if can_stream(self, key) else None
        verify = self.config.verify
        if streamer is not None and (verify == "every" or (verify == "first" and not self.book.checked_any(key))):
            streamer.check = StreamCheck(self, batch, n, self._mask)  # this batch is checked as it streams
        # a rerun when shared calls cannot be expanded, one when in-place changes show, one when streaming fails
        for _ in range(4):
            grad_ctx = torch.enable_grad() if self.mode == "global" else torch.no_grad()
            with grad_ctx:
                try:
                    out, sites = self._forward(batch, n, consume=streamer)
                except Exception:
                    if streamer is not None:
                        undo(self, batch, n, streamer)
                    if self._probe_out is None:
                        raise
                    # the model tiles a shared output itself (.repeat, a broadcast against [B·nW, ...]): an
                    # expanded call does not fit it, so the shared calls' parameters go to enclosing calls
                    out = None
                if self._probe_out is not None and (out is None or not self._same_output(out)):
                    self.notice_once("expand", "expanding shared calls changes this model's output; not expanding")
                    self.plan, self._probe_out = self._probe.plan(self.params, expand=False), None
                    continue
                self._probe = self._probe_out = None
                # Decided once per pass: modules whose captured tensors the model changes in place (a ReLU with
                # inplace=True after them) are captured as copies from then on; only that batch runs twice.
                changed = {(id(s.module), part) for s in sites for part in s.changed_parts()}
                if streamer is not None and (changed or not streamer.holds(key)):
                    undo(self, batch, n, streamer)  # and run the batch with every call kept
                    streamer = None
                    if not changed:
                        continue
                if changed:
                    if changed <= self._clone_modules:
                        raise ImportanceError("captured tensors changed in place even on copies")
                    self._clone_modules |= changed
                    self.notice_once(
                        "inplace",
                        "a layer input or output is modified in place (e.g. ReLU(inplace=True)); "
                        "capturing copies of it for the rest of the pass",
                    )
                    continue
            try:
                self._reduce_captured(out, sites, batch, streamer=streamer)
            except BaseException:
                if streamer is not None:
                    undo(self, batch, n, streamer)
                raise
            return
        raise ImportanceError("captured tensors changed in place even on copies")

    def _reduce_captured(self, out: Tensor, sites: list[Site], batch: Any = None, streamer: Any = None) -> None:
        """Δ of the captured calls, checks, and the statistics of one batch (``streamer``: ``sites`` are the
        calls a streamed forward kept; the others were reduced as they returned)."""
        streamed = streamer is not None
        grad_ctx = torch.enable_grad() if self.mode == "global" else torch.no_grad()
        key = self._signature
        counts = None
        if self.mode == "global" and key is not None and not self.sharded:
            counts = read_counts(out)
        elif self.mode == "local" and key is not None:
            counts = self._local_reads
        if counts is not None:
            if not self.book.same_reads(key, counts):
                self.book.forget(key)
                if self._replanned:
                    raise ImportanceError("the parameters' reads change between two runs of the same batch")
                raise _Replan
        if self.estimator != "batch" and self.batch_samples > 1:
            for s in sites:
                if not s.batched and id(s.module) in self.plan.unfollowed:
                    raise LayoutError(
                        f"module '{s.path}' ({type(s.module).__name__}) gets rows computed from the batch whose "
                        "samples its tensors' sizes do not show (gathered tokens, windows or heads folded into the "
                        "batch)"
                    )
        with grad_ctx:
            if self.mode == "local":
                self._local_deltas(sites)
            for s in sites:
                for rule, _ in self.plan.sites[id(s.module)].groups:
                    rule.check(self.acc, s, self._needs_samples(rule, s))
            if self.mode == "global":
                self._global_deltas(out, sites)
        if not streamed and key is not None and self.mode == "local":
            self.book.note_calls(key, Counter(id(s.module) for s in sites))
        if streamed and streamer.check is not None:  # the streamed calls were added as they returned
            streamer.check.add(sites)
            streamer.check.finish()
            self.book.checked((key, tuple(streamer.layouts)))
        if (
            not streamed
            and batch is not None
            and self.config.verify != "off"
            and self.estimator != "batch"
            and not self.sharded
        ):
            layouts = (key, tuple(s.layout for s in sites))
            if self.config.verify == "every" or self.book.needs_check(layouts):
                verify_batch(self, batch, sites, self.batch_samples, self._mask)
                self.book.checked(layouts)
        # The forward may run under autocast (bf16 activations); the statistics are computed in fp32.
        # no autograd history for the statistics (the generic rule's torch.func transforms ignore no_grad)
        with torch.autocast(self._device_type, enabled=False), torch.no_grad():
            reduce_sites(self.acc, sites, self.plan)

    def _local_deltas(self, sites: list[Site]) -> None:
        local_deltas(sites, self._mask, self.activation_of)

    def _global_deltas(self, out: Tensor, sites: list[Site]) -> None:
        global_deltas(self, out, sites)
