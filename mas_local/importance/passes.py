"""A pass over the data: the public :func:`compute_importance` and the loop behind it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from torch import Tensor, nn

from ..config import DEFAULT_CHUNK_BYTES, Activation, ImportanceConfig
from ..distributed.fsdp import is_dtensor, reshard
from ..distributed.groups import resolve_group, sync_statistics, unwrap
from ..distributed.sharded import ShardedEstimator
from ..errors import ImportanceError
from .estimator import Estimator

log = logging.getLogger("mas_local")


def make_estimator(model: nn.Module, config: ImportanceConfig, group: Any = None) -> Estimator:
    """An :class:`Estimator`, or a :class:`~mas_local.distributed.sharded.ShardedEstimator` for FSDP2 models."""
    model = unwrap(model)
    reshard(model)
    if any(is_dtensor(p) for p in model.parameters()):
        return ShardedEstimator(model, config=config, group=group)
    return Estimator(model, config=config)


def run_pass(
    est: Estimator,
    data: Iterable[Any],
    *,
    eval_mode: bool | None = None,
    progress: bool | None = None,
    max_batches: int | None = None,
    start: int = 0,
    on_batch: Callable[[Estimator], None] | None = None,
    allow_empty: bool = False,
) -> Estimator:
    """Feed ``data`` (skipping the first ``start`` batches) into ``est``; restores each module's mode.

    ``eval_mode``/``progress`` default to the estimator's config. ``on_batch(est)`` runs after
    each batch (checkpointing); ``allow_empty`` lets a rank with no data of its own take part
    in a distributed pass.
    """
    if isinstance(data, (Tensor, Mapping)):
        raise TypeError("data must be an iterable of batches (e.g. a DataLoader or a list of tensors), not one batch")
    eval_mode = est.config.eval_mode if eval_mode is None else eval_mode
    progress = est.config.progress if progress is None else progress
    if est.frozen:
        log.info("mas_local: skipping %d parameters with requires_grad=False: %s", len(est.frozen), est.frozen)
    model = est.model
    was_training = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    try:
        from tqdm.auto import tqdm

        total = len(data) if hasattr(data, "__len__") else None
        # the bar only counts: given the data, tqdm.auto's asyncio flavour calls iter() on it in its constructor,
        # which starts a DataLoader (its workers, a draw from the global generator) a second time
        bar = tqdm(total=total, desc=f"MAS {est.mode}/{est.estimator}", disable=None if progress else True, leave=False)
        try:
            for i, batch in enumerate(data if max_batches is None or max_batches > start else ()):
                if i >= start:
                    est.update(batch)
                    if on_batch is not None:
                        on_batch(est)
                bar.update(1)
                if max_batches is not None and i + 1 >= max_batches:
                    break  # before drawing another batch: a stream loses nothing past the limit
        finally:
            bar.close()
    finally:
        for m, training in was_training.items():
            m.training = training
        reshard(model)  # FSDP2 keeps the root unsharded after a forward without backward
    if est.batches == 0 and not allow_empty:
        raise ImportanceError("data yielded no batches; importance needs at least one")
    return est


def compute_importance(
    model: nn.Module,
    data: Iterable[Any],
    mode: str = "global",
    estimator: str | None = None,
    output_fn: Callable[[Any], Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    mask: str | Callable[[Any], Tensor] | None = "attention_mask",
    backend: str = "auto",
    *,
    eval_mode: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = True,
    max_batches: int | None = None,
    sync: bool | None = None,
    process_group: Any = None,
    activation: Activation = None,
    precision: str = "accurate",
    micro_batch: int | None = None,
    verify: str | bool = "first",
    stream: bool = True,
) -> dict[str, Tensor]:
    """Estimate MAS importance Ω for every trainable parameter of ``model``.

    Args:
        model: any ``nn.Module`` (a DDP wrapper is looked through).
        data: an iterable of batches: a Tensor (``model(x)``), a tuple/list (the first
            element is the input; labels are never used) or a dict (``model(**batch)``).
        mode: ``"global"`` (gradients of the squared output norm) or ``"local"``
            (each module judged by its own output).
        estimator: ``"sample"`` (paper-exact, per-sample; global default),
            ``"batch"`` (per batch, as the official code and Avalanche), ``"hebbian"`` (local default).
        output_fn: picks the output tensor from what the model returns (default:
            the tensor, its ``.logits``, or a tuple's first element).
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch, replacing the
            default (a Tensor: ``model(x)``; a dict: ``model(**batch)``; a tuple/list: its first
            element as one of those, the rest ignored).
        mask: the positions that count (``docs/math.md``, "Masks"): a key of dict batches
            (default ``"attention_mask"``, the Hugging Face convention), a callable
            ``batch -> bool [B, T]``, or ``None`` for every position.
        backend: ``"auto" | "torch" | "triton" | "ext"`` for the fused ops.
        eval_mode: run in ``eval()`` (default) and restore every module's mode afterwards.
        chunk_bytes: memory bound for the per-sample work of one module call.
        progress: show a progress bar (tqdm; hidden when stderr is not a terminal).
        max_batches: stop after this many batches.
        sync: under ``torch.distributed`` each rank passes its own share of the data and
            the statistics are all-reduced, so every rank returns the Ω of all the data.
            ``None`` (default): sync when a process group with more than one rank is
            initialised; ``False``: this rank's data only; ``True``: require a group.
        process_group: the group to sync over (default: the world).
        activation: local mode only: judge Linear/Conv layers by ``act(y)`` instead of
            their pre-activation output ``y`` (one callable for all such layers, or a
            mapping from module names/glob patterns to callables).
        precision: operand precision of the GEMM-shaped ops, one contract on every backend (``docs/triton.md``,
            "Precision"): ``"accurate"`` (default), ``"exact"`` or ``"fast"``. On the CPU every setting runs
            IEEE fp32 (float64 for ``"exact"`` in the torch reference, and for float64 models).
        micro_batch: run each batch in pieces of at most this many samples; Ω is unchanged (per-sample
            statistics add up over any split) and activation memory is bounded. ``sample`` and
            ``hebbian`` only.
        verify: the self-check (``docs/math.md``, "The self-check"): the per-sample gradients summed over a
            random subset of the samples must equal autograd's gradient of that subset's loss. ``"first"``
            (default): on the first batch of each batch signature; ``"every"``: every batch; ``"off"``.
            A batch that fails is computed one sample at a time; if that fails too, the pass raises.
        stream: local mode: reduce each module call as soon as it returns and drop what was captured for
            it, so that memory does not grow with depth; global ``sample``: reduce each call during the
            backward as soon as its Δ is complete (``docs/performance.md``). Ω is the same with ``False``,
            which keeps every call of a batch until its forward (local) or backward (global) ends.

    Returns:
        ``{parameter name: Ω}``, float32 (float64 for a float64 parameter), detached, on each parameter's
        device. Parameters with ``requires_grad=False`` are left out (and logged). The definitions are in
        ``docs/math.md``.
    """
    config = ImportanceConfig(
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
        eval_mode=eval_mode,
        progress=progress,
        sync=sync,
        process_group=process_group,
    )
    group = resolve_group(config.sync, config.process_group)
    est = make_estimator(model, config, group)
    run_pass(est, data, max_batches=max_batches, allow_empty=group is not None)
    if group is not None:
        sync_statistics(est.stats, group)
    return est.result(release=True)  # the estimator ends here: Ω is made in its accumulators
