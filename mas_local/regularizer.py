"""The MAS regulariser: importance accumulated over tasks and the penalty λ Σ Ω (θ − θ*)²."""

from __future__ import annotations

import dataclasses
import os
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

ACCUMULATE = ("sum", "ema")
_STATE_VERSION = 1
OMEGA_DTYPES = (torch.float32, torch.bfloat16)


class MAS:
    """Memory Aware Synapses for one model across a sequence of tasks.

    After each task call :meth:`consolidate` with that task's data: it estimates
    the task's Ω, adds it to the running importance (``accumulate="sum"``, as the
    paper) or blends it (``"ema"``: Ω ← αΩ_old + (1−α)Ω_new), and snapshots the
    parameters as θ*. While training later tasks, add :meth:`penalty` to the loss,
    or call :meth:`add_penalty_grad_` after ``loss.backward()`` (fused, no graph).

    Parameters with ``requires_grad=False`` when MAS is created are not
    regularised; their names are in :attr:`skipped`. Tied parameters appear once.

    Scale (see ``docs/distributed.md``): under ``torch.distributed`` the importance
    pass is data parallel (``sync``/``process_group``, as :func:`compute_importance`);
    a DDP wrapper is looked through and parameters keep the inner module's names;
    FSDP2 parameters get Ω and θ* sharded like themselves. ``omega_dtype``
    (float32 or bfloat16) is the storage dtype of the accumulated Ω; estimation
    always accumulates in float32. θ* keeps each parameter's dtype.

    ``activation`` (local mode): judge Linear/Conv layers by ``act(y)`` rather than
    their pre-activation ``y``; one callable, or ``{module name or glob: callable}``.
    ``precision`` (``"accurate"``/``"exact"``/``"fast"``) is the abs-GEMM operand precision on GPUs.
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

    # ---------------------------------------------------------------- settings
    mode = property(lambda self: self.config.mode)
    estimator = property(lambda self: self.config.estimator)
    backend = property(lambda self: self.config.backend)
    precision = property(lambda self: self.config.precision)
    chunk_bytes = property(lambda self: self.config.chunk_bytes)
    output_fn = property(lambda self: self.config.output_fn)

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

        Resumable passes: with ``checkpoint_path`` the partial statistics are saved
        atomically every ``checkpoint_every`` batches (one file per rank when synced);
        if a valid checkpoint exists when the pass starts, its batches are skipped
        (``data`` must yield the same batches in the same order) and the pass resumes.
        The checkpoint is removed once Ω is committed.
        """
        group = groups.resolve_group(self.config.sync, self.config.process_group)
        est = make_estimator(self.model, self.config, group)
        path, start, on_batch = None, 0, None
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        if checkpoint_path is not None:
            path = checkpoint.rank_path(checkpoint_path, group)
            if os.path.exists(path):
                state = checkpoint.load_checkpoint(path)
                task = state.get("mas_task") if isinstance(state, dict) else None
                if task != self.num_tasks:
                    raise ValueError(
                        f"checkpoint {path!r} belongs to task {task!r}, this MAS is consolidating task "
                        f"{self.num_tasks}; remove it to start over"
                    )
                est.load_state_dict(state)
                start = est.batches
            if checkpoint_every is not None:

                def on_batch(e):
                    if e.batches % checkpoint_every == 0:
                        checkpoint.save_atomic({**e.state_dict(), "mas_task": self.num_tasks}, path)

        elif checkpoint_every is not None:
            raise ValueError("checkpoint_every needs checkpoint_path")
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
        omega = self.commit(est.result())
        if path is not None and os.path.exists(path):
            os.remove(path)
        return omega

    def commit(self, task_omega: dict[str, Tensor]) -> dict[str, Tensor]:
        """Accumulate an already estimated task Ω (e.g. merged across processes) and snapshot θ*."""
        missing = set(self.params) - set(task_omega)
        if missing:
            raise ValueError(f"task importance lacks parameters: {sorted(missing)}")
        for name, p in self.params.items():
            if task_omega[name].shape != p.shape:
                raise ValueError(
                    f"task importance for {name!r} has shape {tuple(task_omega[name].shape)}, "
                    f"parameter has {tuple(p.shape)}"
                )
        new = {}
        for name, p in self.params.items():
            omega = task_omega[name].detach().to(device=p.device, dtype=torch.float32)
            if not fsdp.is_dtensor(omega):
                omega = fsdp.shard_like(omega, p)  # FSDP2: keep this rank's shard only
            if self.num_tasks == 0 or name not in self.importance:
                new[name] = omega.clone()
            elif self.accumulate == "sum":
                new[name] = self.importance[name].float() + omega
            else:
                new[name] = self.alpha * self.importance[name].float() + (1.0 - self.alpha) * omega
            new[name] = new[name].to(self.omega_dtype)
        self.importance = new
        self.anchors = {name: p.detach().clone() for name, p in self.params.items()}
        self.num_tasks += 1
        return task_omega

    # ---------------------------------------------------------------- the penalty
    def _terms(self):
        for name, p in self.params.items():
            if name in self.importance:
                yield name, p, self.anchors[name], self.importance[name]

    def penalty(self) -> Tensor:
        """``λ Σ Ω (θ − θ*)²`` as a differentiable scalar (0 before the first consolidation)."""
        if any(fsdp.is_dtensor(p) for p in self.params.values()):
            return sharded_penalty(self)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        total = torch.zeros((), device=device, dtype=torch.float32)
        for _, p, anchor, omega in self._terms():
            total = total + (omega * (p.float() - anchor.float()).pow(2)).sum()
        return self.lam * total

    def add_penalty_grad_(self) -> Tensor:
        """Add ``2λΩ(θ−θ*)`` to each parameter's ``.grad`` (created if ``None``); returns the penalty value.

        Call after ``loss.backward()`` of the task loss; one fused op over all
        parameters, no autograd graph.
        """
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
            return ops.penalty_grad_(
                [p.grad for _, p, _, _ in terms],
                [p.detach() for _, p, _, _ in terms],
                [a for _, _, a, _ in terms],
                [o for _, _, _, o in terms],
                self.lam,
                self.backend,
            )

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Importance, θ* and settings; tensors only, so it loads with ``torch.load(weights_only=True)``."""
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
        """Load a state saved by :meth:`state_dict`; refuses a state from another model (names, shapes)."""
        if not isinstance(state, dict) or "importance" not in state or "anchors" not in state:
            raise ValueError("not a MAS state dict (missing 'importance'/'anchors')")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported MAS state version {state.get('version')!r}; expected {_STATE_VERSION}")
        num_tasks = int(state.get("num_tasks", 0))
        importance, anchors = state["importance"], state["anchors"]
        if num_tasks > 0 or importance or anchors:
            expected = set(self.params)
            for what, table in (("importance", importance), ("anchors", anchors)):
                got = set(table)
                if got != expected:
                    raise ValueError(
                        f"MAS state does not match this model: {what} has unexpected parameters "
                        f"{sorted(got - expected)[:10]} and lacks {sorted(expected - got)[:10]}"
                    )
                for name, p in self.params.items():
                    t = table[name]
                    if not isinstance(t, Tensor) or t.shape != p.shape:
                        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                        raise ValueError(
                            f"MAS state does not match this model: {what}[{name!r}] has shape {shape}, "
                            f"the parameter has {tuple(p.shape)}"
                        )
                    if not torch.isfinite(fsdp.shard_of(t).float()).all():
                        raise ValueError(f"MAS state has NaN/Inf values in {what}[{name!r}]")
        config = dataclasses.replace(
            self.config, mode=state.get("mode", self.mode), estimator=state.get("estimator", self.estimator)
        )
        self.importance = {
            k: _like(importance[k].detach().to(self.params[k].device, self.omega_dtype), self.params[k])
            for k in importance
        }
        self.anchors = {
            k: _like(anchors[k].detach().to(self.params[k].device, self.params[k].dtype), self.params[k])
            for k in anchors
        }
        self.config = config
        self.accumulate = state.get("accumulate", self.accumulate)
        self.alpha = float(state.get("alpha", self.alpha))
        self.lam = float(state.get("lam", self.lam))
        self.num_tasks = num_tasks

    # ---------------------------------------------------------------- memory
    def memory_report(self) -> memory.MemoryReport:
        """Bytes MAS adds on this rank: Ω, θ* and the transient estimation buffers, per parameter and device.

        A dict (``params``, ``devices``, ``total``, ``bytes_per_param``, ``omega_dtype``) whose
        ``str()`` is a table; see :func:`mas_local.distributed.memory.memory_report`.
        """
        return memory.memory_report(self)


def _like(t: Tensor, p: Tensor) -> Tensor:
    """A loaded tensor laid out like its parameter (a copy; a DTensor shard for FSDP2 parameters)."""
    if fsdp.is_dtensor(p) and not fsdp.is_dtensor(t):
        return fsdp.shard_like(t, p).clone()
    return t.clone()
