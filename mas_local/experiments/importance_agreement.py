"""Global vs local importance on one model: the four estimators, compared per tensor and per layer type.

All four estimators (:data:`~.config.MAS_METHODS`) run with ``mas_local.compute_importance``
on the same model and data; each pair of :data:`ESTIMATOR_PAIRS` is compared by the
Spearman rank correlation of Ω per parameter tensor, and per layer type (attention q/k/v,
MLP in, norms, ...: :data:`~.models.LAYER_TYPES`) over all the type's parameters pooled, and over
the whole model (docs/compare.md, "Reading the outputs"). Each estimator is also run once more
to measure its peak extra memory.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import metrics
from .config import MAS_METHODS, Config
from .cost import peak_extra_bytes
from .data import Task, importance_batches
from .models import LAYER_TYPES, ActiveHead, Net, parameter_labels
from .training import synchronize

WHOLE_MODEL = "whole model"

ESTIMATOR_PAIRS = (
    ("global-sample", "local-hebbian"),
    ("global-sample", "local-sample"),
    ("global-sample", "global-batch"),
    ("local-hebbian", "local-sample"),
)


def compare_estimators(model: Net, task: Task, cfg: Config) -> dict:
    """Ω of every estimator on ``task``'s training images and Spearman ρ for each pair.

    Returns ``seconds`` and ``peak_bytes`` (per estimator; the peak from a second, profiled run),
    ``spearman`` (``"a vs b"`` -> parameter -> ρ), ``spearman_by_type`` (``"a vs b"`` -> layer
    type or ``"whole model"`` -> ρ over the pooled Ω), ``omegas`` (estimator -> parameter -> flat
    numpy Ω), ``params`` (the trainable parameter names in model order) and ``labels``
    (:func:`~.models.parameter_labels`, with each parameter's layer ``type``).
    """
    import mas_local as ml

    device = torch.device(cfg.device)
    data = importance_batches(task, cfg.importance_batch_size)
    omegas: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    peak: dict[str, int] = {}
    for name, (mode, estimator) in MAS_METHODS.items():

        def estimate(mode=mode, estimator=estimator):
            with ActiveHead(model, task.head):
                return ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)

        synchronize(device)
        t0 = time.perf_counter()
        imp = estimate()
        synchronize(device)
        seconds[name] = time.perf_counter() - t0
        _, peak[name] = peak_extra_bytes(estimate, device)
        omegas[name] = {k: v.detach().float().cpu().numpy().ravel() for k, v in imp.items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    labels = {n: lab for n, lab in parameter_labels(model).items() if n in names}
    rho: dict[str, dict[str, float]] = {}
    rho_by_type: dict[str, dict[str, float]] = {}
    for a, b in ESTIMATOR_PAIRS:
        both = [n for n in names if n in omegas[a] and n in omegas[b]]
        rho[f"{a} vs {b}"] = {n: metrics.spearman(omegas[a][n], omegas[b][n]) for n in both}
        rho_by_type[f"{a} vs {b}"] = agreement_by_type(omegas[a], omegas[b], both, labels, cfg.model)
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "spearman": rho,
        "spearman_by_type": rho_by_type,
        "omegas": omegas,
        "params": names,
        "labels": labels,
    }


def agreement_by_type(
    omega_a: dict[str, np.ndarray], omega_b: dict[str, np.ndarray], names: list[str], labels: dict, model: str
) -> dict[str, float]:
    """Spearman ρ of two estimators' Ω over every parameter of each layer type pooled, and of the whole model.

    Pooling ranks the parameters of all tensors of a type together (every block's ``q``, ``k`` and
    ``v``, weights and biases), which is how the penalty weighs them against each other.
    """
    out: dict[str, float] = {}
    for kind in (*LAYER_TYPES[model], WHOLE_MODEL):
        members = [n for n in names if kind == WHOLE_MODEL or labels[n]["type"] == kind]
        if members:
            out[kind] = metrics.spearman(
                np.concatenate([omega_a[n] for n in members]), np.concatenate([omega_b[n] for n in members])
            )
    return out
