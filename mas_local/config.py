"""The importance settings, validated once.

Every entry point (:func:`mas_local.compute_importance`, :class:`mas_local.MAS`,
:class:`mas_local.importance.Estimator`) builds one :class:`ImportanceConfig`; nothing
below it re-validates or re-threads the settings. The definitions behind the
settings are in ``docs/math.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from .ops import PRECISIONS
from .ops.backend import requested_backend

MODES = ("global", "local")
ESTIMATORS = {"global": ("sample", "batch"), "local": ("hebbian", "sample", "batch")}
DEFAULT_ESTIMATOR = {"global": "sample", "local": "hebbian"}
DEFAULT_CHUNK_BYTES = 256 << 20

Activation = Callable[[Tensor], Tensor] | Mapping[str, Callable[[Tensor], Tensor]] | None


@dataclass(frozen=True)
class ImportanceConfig:
    """How one importance pass is computed.

    mode: ``"global"`` (gradients of the squared output norm) or ``"local"`` (each
        module judged by its own output).
    estimator: ``"sample"``, ``"batch"`` or (local) ``"hebbian"``; ``None`` picks the
        mode's default (``"sample"`` for global, ``"hebbian"`` for local).
    output_fn: picks the measured tensor from what the model returns.
    forward_fn: ``forward_fn(model, batch)`` runs the model on one batch (default: ``docs/math.md``,
        "Batches").
    mask: which positions count: a key of dict batches (default ``"attention_mask"``), a callable
        ``batch -> bool [B, T]``, or ``None`` (every position).
    backend: ``"auto" | "torch" | "triton" | "ext"`` for the fused ops.
    chunk_bytes: memory bound for the per-sample work of one module call.
    activation: local mode only: judge Linear/Conv layers by ``act(y)``.
    precision: operand precision of the fused GEMMs (``"accurate" | "exact" | "fast"``).
    micro_batch: run each batch in pieces of at most this many samples (``sample`` and ``hebbian`` only:
        their statistics add up over any split, so Ω is the same and activation memory is bounded).
    eval_mode: run the pass in ``eval()`` and restore each module's mode afterwards.
    progress: show a tqdm bar (hidden off a terminal).
    verify: the self-check (``docs/math.md``): ``"first"`` (default) on the first batch of each batch
        signature, ``"every"`` batch, or ``"off"`` (``True``/``False`` mean ``"first"``/``"off"``).
    stream: local mode: reduce each module call as soon as it returns and drop what was captured for it, so
        that the pass needs about inference memory whatever the depth; global ``sample``: reduce each call
        during the backward as soon as its Δ is complete (``docs/performance.md``). ``False`` keeps every
        call of a batch until its forward (local) or backward (global) ends. Ω is the same either way.
    sync / process_group: data-parallel passes (see ``docs/distributed.md``).
    """

    mode: str = "global"
    estimator: str | None = None
    output_fn: Callable[[Any], Tensor] | None = None
    forward_fn: Callable[[Any, Any], Any] | None = None
    mask: str | Callable[[Any], Tensor] | None = "attention_mask"
    backend: str = "auto"
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    activation: Activation = None
    precision: str = "accurate"
    micro_batch: int | None = None
    eval_mode: bool = True
    progress: bool = True
    verify: str | bool = "first"
    stream: bool = True
    sync: bool | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        estimator = DEFAULT_ESTIMATOR[self.mode] if self.estimator is None else self.estimator
        if estimator not in ESTIMATORS[self.mode]:
            raise ValueError(
                f"unknown estimator {estimator!r} for mode {self.mode!r}; expected one of {ESTIMATORS[self.mode]}"
            )
        object.__setattr__(self, "estimator", estimator)
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; expected one of {PRECISIONS}")
        if not isinstance(self.backend, str):
            raise TypeError(f"backend must be a string, got {type(self.backend).__name__}")
        requested_backend(self.backend)  # raises on an unknown name
        if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int) or self.chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be a positive int, got {self.chunk_bytes!r}")
        if self.output_fn is not None and not callable(self.output_fn):
            raise TypeError(f"output_fn must be callable, got {type(self.output_fn).__name__}")
        if self.forward_fn is not None and not callable(self.forward_fn):
            raise TypeError(
                f"forward_fn must be callable as forward_fn(model, batch), got {type(self.forward_fn).__name__}"
            )
        if self.mask is not None and not isinstance(self.mask, str) and not callable(self.mask):
            raise TypeError(f"mask must be a key name, a callable batch -> bool [B, T], or None, got {self.mask!r}")
        if self.activation is not None:
            if self.mode != "local":
                raise ValueError("activation= applies to local MAS only (global MAS measures the model output)")
            if not callable(self.activation) and not isinstance(self.activation, Mapping):
                raise TypeError(
                    f"activation must be a callable or a mapping of module names to callables, got {self.activation!r}"
                )
        if self.micro_batch is not None:
            if isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) or self.micro_batch < 1:
                raise ValueError(f"micro_batch must be a positive int or None, got {self.micro_batch!r}")
            if estimator == "batch":
                raise ValueError("micro_batch does not apply to estimator='batch': |g_B| is taken over the whole batch")
        verify = (
            {True: "first", False: "off"}.get(self.verify, self.verify)
            if isinstance(self.verify, bool)
            else self.verify
        )
        if verify not in ("first", "every", "off"):
            raise ValueError(f"verify must be 'first', 'every', 'off', True or False, got {self.verify!r}")
        object.__setattr__(self, "verify", verify)
        if not isinstance(self.stream, bool):
            raise TypeError(f"stream must be True or False, got {self.stream!r}")
        if self.sync not in (None, True, False):
            raise ValueError(f"sync must be None, True or False, got {self.sync!r}")

    @property
    def per_sample(self) -> bool:
        """Whether the estimator needs each sample's own gradient (sample, and hebbian outside Linear/Conv)."""
        return self.estimator in ("sample", "hebbian")
