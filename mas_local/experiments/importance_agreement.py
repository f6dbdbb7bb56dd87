"""Global vs local importance on one model: the four estimators, compared per parameter tensor.

All four estimators (:data:`~.config.MAS_METHODS`) run with ``mas_local.compute_importance``
on the same model and data; each pair of :data:`ESTIMATOR_PAIRS` is compared by the
Spearman rank correlation of Ω per parameter tensor (docs/compare.md, "Reading the outputs").
"""

from __future__ import annotations

import time

import numpy as np
import torch

from . import metrics
from .config import MAS_METHODS, Config
from .data import Task, importance_batches
from .models import ActiveHead, Net, parameter_labels
from .training import synchronize

ESTIMATOR_PAIRS = (
    ("global-sample", "local-hebbian"),
    ("global-sample", "local-sample"),
    ("global-sample", "global-batch"),
    ("local-hebbian", "local-sample"),
)


def compare_estimators(model: Net, task: Task, cfg: Config) -> dict:
    """Ω of every estimator on ``task``'s training images and Spearman ρ per tensor for each pair.

    Returns ``seconds`` (per estimator), ``spearman`` (``"a vs b"`` -> parameter -> ρ),
    ``omegas`` (estimator -> parameter -> flat numpy Ω), ``params`` (the trainable
    parameter names in model order) and ``labels`` (:func:`~.models.parameter_labels`).
    """
    import mas_local as ml

    device = torch.device(cfg.device)
    data = importance_batches(task, cfg.importance_batch_size)
    omegas: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, (mode, estimator) in MAS_METHODS.items():
        synchronize(device)
        t0 = time.perf_counter()
        with ActiveHead(model, task.head):
            imp = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
        synchronize(device)
        seconds[name] = time.perf_counter() - t0
        omegas[name] = {k: v.detach().float().cpu().numpy().ravel() for k, v in imp.items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rho: dict[str, dict[str, float]] = {}
    for a, b in ESTIMATOR_PAIRS:
        rho[f"{a} vs {b}"] = {
            n: metrics.spearman(omegas[a][n], omegas[b][n]) for n in names if n in omegas[a] and n in omegas[b]
        }
    labels = {n: lab for n, lab in parameter_labels(model).items() if n in names}
    return {"seconds": seconds, "spearman": rho, "omegas": omegas, "params": names, "labels": labels}
