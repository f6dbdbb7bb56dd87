"""The MAS regulariser: importance accumulated over tasks and the penalty λ Σ Ω (θ − θ*)²."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import ops
from .config import DEFAULT_CHUNK_BYTES, Activation, ImportanceConfig
from .distributed import checkpoint, fsdp, groups, memory
from .distributed.penalty import sharded_add_penalty_grad_, sharded_penalty
from .importance.activations import resolve_activations
from .importance.estimator import Estimator
from .importance.passes import make_estimator, run_pass
from .state import (
    describe_changes,
    param_changes,
    refreshed_tables,
    same_setting,
    shaped_like,
    validate_state,
    zero_omega,
)

log = logging.getLogger("mas_local")

ACCUMULATE = ("sum", "ema")
_STATE_VERSION = 1
OMEGA_DTYPES = (torch.float32, torch.bfloat16)
_SETTINGS = ("mode", "estimator", "accumulate", "alpha", "lam")  # saved in state_dict, never loaded from it


class MAS:
    """Memory Aware Synapses for one model across a sequence of tasks.

    After each task call :meth:`consolidate` with that task's data: it estimates
    the task's Ω, adds it to the running importance (``accumulate="sum"``, as the
    paper) or blends it (``"ema"``: Ω ← αΩ_old + (1−α)Ω_new), and snapshots the
    parameters as θ*. While training later tasks, add :meth:`penalty` to the loss,
    or call :meth:`add_penalty_grad_` after ``loss.backward()`` (fused, no graph).

    Parameters with ``requires_grad=False`` when MAS is created are not
    regularised; their names are in :attr:`skipped`. Tied parameters appear once.

    The regularised parameters are fixed when MAS is created (:attr:`params`). If the
    model's trainable parameters change later (layers unfrozen, a head replaced), MAS
    warns, once at the next :meth:`penalty`/:meth:`add_penalty_grad_` and at
    :meth:`consolidate`; :meth:`refresh_params` takes the model's current trainable
    parameters (new ones get Ω = 0 until the next consolidation, parameters no longer in
    the model are dropped), and :meth:`consolidate` estimates and regularises the current
    ones. A regularised parameter that is frozen later keeps its Ω and θ* but is not
    penalised while frozen; consolidations leave its Ω and θ* as they are (``docs/api.md``).

    Scale (see ``docs/distributed.md``): under ``torch.distributed`` the importance
    pass is data parallel (``sync``/``process_group``, as :func:`compute_importance`);
    DDP and ``torch.compile`` wrappers are looked through and parameters keep the inner
    module's names;
    FSDP2 parameters get Ω and θ* sharded like themselves. ``omega_dtype``
    (float32 or bfloat16) is the storage dtype of the accumulated Ω; estimation
    accumulates in float32 (float64 for float64 parameters). θ* keeps each parameter's dtype.

    ``activation`` (local mode): judge Linear/Conv layers by ``act(y)`` rather than
    their pre-activation ``y``; one callable, or ``{module name or glob: callable}``.
    ``precision`` (``"accurate"``/``"exact"``/``"fast"``) is the operand precision of the GEMM-shaped ops on
    every backend (``docs/triton.md``).
    ``verify`` is the self-check of :func:`compute_importance` (``"first"``, ``"every"`` or ``"off"``);
    ``stream`` (local mode) reduces each module call as it returns (:func:`compute_importance`).
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1.0,
        mode: str = "global",
        estimator: str | None = None,
        accumulate: str = "sum",
        alpha: float = 0.5,
        output_fn: Callable[[Any], Tensor] | None = None,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        mask: str | Callable[[Any], Tensor] | None = "attention_mask",
        backend: str = "auto",
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        progress: bool = True,
        omega_dtype: torch.dtype = torch.float32,
        sync: bool | None = None,
        process_group: Any = None,
        activation: Activation = None,
        precision: str = "accurate",
        micro_batch: int | None = None,
        verify: str | bool = "first",
        stream: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.config = ImportanceConfig(
            mode=mode,
            estimator=estimator,
            output_fn=output_fn,
            forward_fn=forward_fn,
            mask=mask,
            backend=backend,
            chunk_bytes=chunk_bytes,
            activation=activation,
            precision=precision,
            micro_batch=micro_batch,
            verify=verify,
            stream=stream,
            progress=progress,
            sync=sync,
            process_group=process_group,
        )
        if not (isinstance(lam, (int, float)) and float(lam) >= 0 and torch.isfinite(torch.tensor(float(lam)))):
            raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
        if accumulate not in ACCUMULATE:
            raise ValueError(f"unknown accumulate {accumulate!r}; expected one of {ACCUMULATE}")
        if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if omega_dtype not in OMEGA_DTYPES:
            raise ValueError(f"omega_dtype must be torch.float32 or torch.bfloat16, got {omega_dtype!r}")
        groups.resolve_group(sync, process_group)  # sync=True without a process group fails now
        self.omega_dtype = omega_dtype
        self.model = model
        self.lam = float(lam)
        resolve_activations(groups.unwrap(model), activation)  # fail now on a bad activation, not after a task
        self.accumulate = accumulate
        self.alpha = float(alpha)
        self.params: dict[str, nn.Parameter] = {}
        self.skipped: list[str] = []
        fsdp.reshard(groups.unwrap(model))  # FSDP2: collect the sharded parameters
        for name, p in groups.unwrap(model).named_parameters():
            if p.requires_grad:
                self.params[name] = p
            else:
                self.skipped.append(name)
        self.importance: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}
        self.num_tasks = 0
        self._params_checked = False  # the parameter set is compared with the model once per penalty phase

    # ---------------------------------------------------------------- settings
    mode = property(lambda self: self.config.mode)
    estimator = property(lambda self: self.config.estimator)
    backend = property(lambda self: self.config.backend)
    precision = property(lambda self: self.config.precision)
    chunk_bytes = property(lambda self: self.config.chunk_bytes)
    output_fn = property(lambda self: self.config.output_fn)

    # ---------------------------------------------------------------- the regularised parameters
    def param_changes(self) -> dict[str, list[str]]:
        """How the model's parameters differ from :attr:`params`, by name (all lists empty: no change).

        ``added``: trainable in the model but not regularised (unfrozen since, or new modules);
        ``removed``: regularised but no longer in the model; ``replaced``: the name now holds another
        parameter object (a new head), so the old, detached one would be penalised instead.
        """
        return param_changes(self.params, dict(groups.unwrap(self.model).named_parameters()))

    def refresh_params(self) -> dict[str, list[str]]:
        """Regularise the model's current trainable parameters; returns the changes (see :meth:`param_changes`).

        Parameters no longer in the model (``removed``, and the old objects of ``replaced``)
        are dropped with their Ω and θ*. New trainable parameters (``added``, and the new
        objects of ``replaced``) get Ω = 0 and θ* = their current value after a consolidation,
        i.e. they are not penalised until the next :meth:`consolidate` estimates them (with
        ``accumulate="ema"`` that first estimate is blended with Ω = 0). Parameters frozen since
        MAS was created keep their Ω and θ*. The changes are logged (``mas_local`` logger, INFO).
        """
        fsdp.reshard(groups.unwrap(self.model))  # FSDP2: the registered parameters are the sharded ones
        changes = self.param_changes()
        if any(changes.values()):
            self.params, self.importance, self.anchors, self.skipped = self._refreshed(changes)
            log.info(
                "mas_local: MAS now regularises the model's current trainable parameters; %s", describe_changes(changes)
            )
        self._params_checked = False
        return changes

    def _refreshed(self, changes: dict[str, list[str]]):
        """New (params, importance, anchors, skipped) for ``changes``; nothing of self is modified."""
        current = dict(groups.unwrap(self.model).named_parameters())
        return refreshed_tables(self, current, changes)

    def _check_params_once(self) -> None:
        """Warn once per penalty phase (until the next consolidate/refresh/load) if the parameters changed."""
        if self._params_checked or torch.compiler.is_compiling():
            return
        self._params_checked = True
        changes = self.param_changes()
        if any(changes.values()):
            warnings.warn(
                f"MAS: the model's trainable parameters changed since MAS took them ({describe_changes(changes)}); the "
                "penalty still covers the old set. Call mas.refresh_params() to regularise the current parameters "
                "(new ones get Ω = 0 until the next consolidate(), which also does this)",
                UserWarning,
                stacklevel=3,
            )

    # ---------------------------------------------------------------- consolidation
    def estimator_for_pass(self) -> Estimator:
        """A fresh :class:`~mas_local.importance.Estimator` configured like this MAS."""
        group = groups.resolve_group(self.config.sync, self.config.process_group)
        return make_estimator(self.model, self.config, group)

    def consolidate(
        self,
        data: Iterable[Any],
        *,
        eval_mode: bool = True,
        max_batches: int | None = None,
        checkpoint_path: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> dict[str, Tensor]:
        """Estimate this task's Ω on ``data``, accumulate it, snapshot θ*; returns the task's Ω.

        Nothing changes if estimation fails. Under ``torch.distributed`` each rank
        passes its own share of ``data`` and the statistics are all-reduced.

        If the model's trainable parameters changed since MAS took them (:meth:`param_changes`),
        a warning names them and the consolidation regularises the current ones, as
        :meth:`refresh_params` does.

        Resumable passes: with ``checkpoint_path`` the partial statistics are saved
        atomically every ``checkpoint_every`` batches (one file per rank when synced);
        if a valid checkpoint exists when the pass starts, its batches are skipped
        (``data`` must yield the same batches in the same order) and the pass resumes.
        The checkpoint is removed once Ω is committed.
        """
        if checkpoint_every is not None and (
            isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1
        ):
            raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if checkpoint_every is not None and checkpoint_path is None:
            raise ValueError("checkpoint_every needs checkpoint_path")
        group = groups.resolve_group(self.config.sync, self.config.process_group)
        est = make_estimator(self.model, self.config, group)  # (re-shards FSDP2 modules)
        changes = self.param_changes()
        changed = any(changes.values())
        if changed:
            warnings.warn(
                f"MAS: the model's trainable parameters changed since MAS took them ({describe_changes(changes)}); "
                "consolidate() regularises the current ones from now on (see MAS.refresh_params)",
                UserWarning,
                stacklevel=2,
            )
        path, start, on_batch = None, 0, None
        if checkpoint_path is not None:
            path = checkpoint.rank_path(checkpoint_path, group)
            if os.path.exists(path):
                self._resume(est, path)
                start = est.batches
            if checkpoint_every is not None:

                def on_batch(e):
                    if e.batches % checkpoint_every == 0:
                        checkpoint.save_atomic({**e.state_dict(), "mas_task": self.num_tasks}, path)

        run_pass(
            est,
            data,
            eval_mode=eval_mode,
            max_batches=max_batches,
            start=start,
            on_batch=on_batch,
            allow_empty=group is not None,
        )
        if group is not None:
            groups.sync_statistics(est.stats, group)
        task_omega = est.result(release=True)  # the estimator ends here: Ω is made in its accumulators
        saved = (self.params, self.importance, self.anchors, self.skipped)
        if changed:
            self.params, self.importance, self.anchors, self.skipped = self._refreshed(changes)
        try:
            omega = self.commit(task_omega)
        except BaseException:
            self.params, self.importance, self.anchors, self.skipped = saved
            raise
        if changed:
            log.info(
                "mas_local: MAS now regularises the model's current trainable parameters; %s", describe_changes(changes)
            )
        if path is not None and os.path.exists(path):
            os.remove(path)
        return omega

    def _resume(self, est: Estimator, path: str) -> None:
        checkpoint.resume_pass(est, path, self.num_tasks)

    def commit(self, task_omega: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accumulate an already estimated task Ω (e.g. merged across processes) and snapshot θ*; returns it detached.

        Every trainable parameter of :attr:`params` needs an entry. A regularised parameter
        that is frozen now and has none keeps its Ω and θ* (Ω = 0 if it never had one).
        """
        missing = [n for n, p in self.params.items() if n not in task_omega and p.requires_grad]
        if missing:
            raise ValueError(f"task importance lacks parameters: {sorted(missing)}")
        for name, p in self.params.items():
            if name in task_omega and task_omega[name].shape != p.shape:
                raise ValueError(
                    f"task importance for {name!r} has shape {tuple(task_omega[name].shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
        new, anchors = {}, {}
        for name, p in self.params.items():
            if name not in task_omega:  # frozen: not part of this task
                kept = self.importance.get(name)
                new[name] = zero_omega(p, self.omega_dtype) if kept is None else kept
                anchors[name] = self.anchors[name] if name in self.anchors else p.detach().clone()
                continue
            anchors[name] = p.detach().clone()
            omega = task_omega[name].detach().to(device=p.device, dtype=torch.float32)
            if not fsdp.is_dtensor(omega):
                omega = fsdp.shard_like(omega, p)  # FSDP2: keep this rank's shard only
            if self.num_tasks == 0 or name not in self.importance:
                new[name] = omega.clone()
            elif self.accumulate == "sum":
                new[name] = self.importance[name].float() + omega
            else:
                new[name] = self.alpha * self.importance[name].float() + (1.0 - self.alpha) * omega
            stored = new[name]
            if fsdp.is_dtensor(stored):
                new[name] = stored.to(self.omega_dtype)
            else:  # in the parameter's memory format (channels_last), so the fused penalty walks it without copies
                new[name] = torch.empty_like(p, dtype=self.omega_dtype).copy_(stored)
        self.importance = new
        self.anchors = anchors
        self.num_tasks += 1
        self._params_checked = False
        return {name: omega.detach() for name, omega in task_omega.items()}

    # ---------------------------------------------------------------- the penalty
    def _terms(self):
        for name, p in self.params.items():
            if p.requires_grad and name in self.importance:  # a frozen parameter cannot move: no term
                yield name, p, self.anchors[name], self.importance[name]

    def penalty(self) -> Tensor:
        """``λ Σ Ω (θ − θ*)²`` as a differentiable scalar (0 before the first consolidation)."""
        self._check_params_once()
        if any(fsdp.is_dtensor(p) for p in self.params.values()):
            return sharded_penalty(self)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        total = torch.zeros((), device=device, dtype=torch.float32)
        for _, p, anchor, omega in self._terms():  # parameters may sit on several devices (device_map="auto")
            wide = torch.float64 if p.dtype == torch.float64 else torch.float32  # θ − θ* before rounding
            total = total + (omega.to(wide) * (p.to(wide) - anchor.to(wide)).pow(2)).sum().to(device)
        return self.lam * total

    def add_penalty_grad_(self) -> Tensor:
        """Add ``2λΩ(θ−θ*)`` to each parameter's ``.grad`` (created if ``None``); returns the penalty value.

        Call after ``loss.backward()`` of the task loss; one fused op over all
        parameters, no autograd graph.
        """
        self._check_params_once()
        terms = list(self._terms())
        if not terms:
            device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
            return torch.zeros((), device=device)
        for _, p, _, _ in terms:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if any(fsdp.is_dtensor(p) for _, p, _, _ in terms):
            return sharded_add_penalty_grad_(self, terms)
        with torch.no_grad():
            return ops.penalty_grad_by_device(
                [p.grad for _, p, _, _ in terms],
                [p.detach() for _, p, _, _ in terms],
                [a for _, _, a, _ in terms],
                [o for _, _, _, o in terms],
                self.lam,
                self.backend,
            )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Importance, θ*, task count and settings; loads with ``torch.load(weights_only=True)``.

        The settings are saved for reference: :meth:`load_state_dict` keeps the loading object's own.
        """
        return {
            "version": _STATE_VERSION,
            "mode": self.mode,
            "estimator": self.estimator,
            "accumulate": self.accumulate,
            "alpha": self.alpha,
            "lam": self.lam,
            "num_tasks": self.num_tasks,
            "importance": {k: v.detach().clone() for k, v in self.importance.items()},
            "anchors": {k: v.detach().clone() for k, v in self.anchors.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load the Ω, θ* and task count saved by :meth:`state_dict`.

        The settings stay this object's own: ``lam``, ``mode``, ``estimator``, ``accumulate``
        and ``alpha`` are what the constructor was given, whatever the state was saved with;
        when the state's differ, a warning names them (Ω estimated with another mode or
        estimator is then accumulated with Ω of this object's definition).

        Refused with a ``ValueError``, leaving this object unchanged: a state of another model
        (parameter names or shapes), NaN/Inf in Ω or θ*, negative Ω, a bad task count.
        """
        num_tasks, importance, anchors = validate_state(state, self.params, _STATE_VERSION)
        differ = {k: state[k] for k in _SETTINGS if k in state and not same_setting(state[k], getattr(self, k))}
        self.importance = {
            k: shaped_like(importance[k].detach().to(self.params[k].device, self.omega_dtype), self.params[k])
            for k in importance
        }
        self.anchors = {
            k: shaped_like(anchors[k].detach().to(self.params[k].device, self.params[k].dtype), self.params[k])
            for k in anchors
        }
        self.num_tasks = num_tasks
        self._params_checked = False
        if differ:
            saved = ", ".join(f"{k}={v!r}" for k, v in differ.items())
            own = ", ".join(f"{k}={getattr(self, k)!r}" for k in differ)
            warnings.warn(
                f"MAS.load_state_dict: the state was saved with {saved}; this MAS keeps its own settings ({own}). "
                "Create the MAS with the saved settings to continue as before",
                UserWarning,
                stacklevel=2,
            )

    # ---------------------------------------------------------------- memory
    def memory_report(self) -> memory.MemoryReport:
        """Bytes MAS adds on this rank: Ω, θ* and the transient estimation buffers, per parameter and device.

        A dict (``params``, ``devices``, ``total``, ``bytes_per_param``, ``omega_dtype``) whose
        ``str()`` is a table; see :func:`mas_local.distributed.memory.memory_report`.
        """
        return memory.memory_report(self)
