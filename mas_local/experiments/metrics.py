"""Continual-learning metrics on an accuracy matrix, and a rank correlation.

The accuracy matrix ``R`` of a run over ``T`` tasks is ``T × T``: ``R[i, j]`` is
the test accuracy on task ``j`` after training on tasks ``0..i`` (row ``i`` is
measured right after task ``i``). Entries above the diagonal (tasks not trained
yet) are measured too but no metric here reads them.

All functions are pure: numpy in, Python floats or numpy arrays out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _matrix(acc) -> np.ndarray:
    r = np.asarray(acc, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] < 1:
        raise ValueError(f"accuracy matrix must be square T x T with T >= 1, got shape {r.shape}")
    return r


def average_accuracy(acc) -> float:
    """Mean accuracy over all tasks after the last one: ``(1/T) Σ_j R[T-1, j]``."""
    r = _matrix(acc)
    return float(r[-1].mean())


def backward_transfer(acc) -> float:
    """BWT (Lopez-Paz & Ranzato, 2017): ``1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])``.

    Negative values mean forgetting. ``nan`` for a single task.
    """
    r = _matrix(acc)
    t = r.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forgetting(acc) -> float:
    """Average forgetting (Chaudhry et al., 2018): ``1/(T-1) Σ_{j<T-1} max_{l∈[j,T-2]} R[l, j] − R[T-1, j]``.

    The drop from the best accuracy a task ever had (after it was learnt) to its
    final accuracy; negative only when a task ends better than it ever was. ``nan`` for a single task.
    """
    r = _matrix(acc)
    t = r.shape[0]
    if t < 2:
        return math.nan
    return float(np.mean([r[j : t - 1, j].max() - r[-1, j] for j in range(t - 1)]))


def learning_accuracy(acc) -> float:
    """Mean accuracy on each task right after learning it: ``(1/T) Σ_j R[j, j]`` (plasticity)."""
    r = _matrix(acc)
    return float(np.mean(np.diag(r)))


def summarize(acc) -> dict[str, float]:
    """All scalar metrics of one accuracy matrix."""
    return {
        "avg_acc": average_accuracy(acc),
        "bwt": backward_transfer(acc),
        "forgetting": forgetting(acc),
        "learning_acc": learning_accuracy(acc),
    }


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and population standard deviation (``ddof=0``; 0 for one value), ignoring nothing."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan}
    return {"mean": float(v.mean()), "std": float(v.std())}


def spearman(x, y) -> float:
    """Spearman rank correlation of two equally long arrays (``scipy.stats.spearmanr``, ties averaged).

    ``nan`` when either array is constant or has fewer than 2 elements (scipy warns there; this does not).
    """
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman: arrays differ in length ({a.size} vs {b.size})")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return math.nan
    return float(spearmanr(a, b).statistic)
