"""The results of a run: aggregation over seeds, the environment, JSON-ready values, the terminal table.

The keys of the results dict are documented in docs/compare.md ("Reading the outputs").
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import torch

from . import metrics
from .config import MAS_METHODS, Config
from .data import classes_per_task

METRIC_DEFINITIONS = {
    "acc_matrix": "R[i][j] = test accuracy on task j after training tasks 1..i+1",
    "avg_acc": "mean_j R[T-1][j]",
    "bwt": "mean_{j<T-1} (R[T-1][j] - R[j][j])",
    "forgetting": "mean_{j<T-1} (max_{j<=l<T-1} R[l][j] - R[T-1][j])",
    "learning_acc": "mean_j R[j][j]",
    "chance_accuracy": "accuracy of a uniform guess among a task's classes (1/10 with the shared head, 1/2 for split)",
    "importance_seconds": "seconds inside mas.consolidate over the whole sequence",
    "importance_seconds_per_task": "seconds of one mas.consolidate (mean over the sequence's consolidations)",
    "importance_peak_mib": "peak extra memory (MiB) of the method's estimator on the task-1 model and images "
    "(torch's allocator: CUDA peak counter, or the CPU allocator's events under torch.profiler)",
    "spearman_by_type": "Spearman rho of two estimators' Omega over all parameters of one layer type pooled",
    "spearman_by_type_within": "mean over one layer type's tensors of the per-tensor Spearman rho",
    "penalty_overhead": "fastest step seconds with loss + mas.penalty() / without - 1 (interleaved, one batch)",
    "penalty_overhead_fused": "same with mas.add_penalty_grad_() after backward instead of penalty()",
    "train_seconds_per_step": "training seconds / optimizer steps on tasks >= 2 (all lambda candidates)",
    "std": "population std over seeds (ddof=0)",
}


def aggregate(cfg: Config, records: dict[str, list[dict]], importance: list[dict], task_names: Sequence[str]) -> dict:
    """Mean ± std over seeds of every metric; chosen λ; timings; importance correlations."""
    methods: dict[str, dict] = {}
    for m, recs in records.items():
        mats = np.array([r["acc_matrix"] for r in recs])
        summary = {k: metrics.mean_std([r["metrics"][k] for r in recs]) for k in recs[0]["metrics"]}
        summary["importance_seconds"] = metrics.mean_std([r["importance_seconds"] for r in recs])
        summary["importance_seconds_per_task"] = None
        summary["importance_peak_mib"] = None
        if m in MAS_METHODS:
            per_task = [float(np.mean(r["consolidate_seconds"])) for r in recs]
            summary["importance_seconds_per_task"] = metrics.mean_std(per_task)
            if importance:
                summary["importance_peak_mib"] = metrics.mean_std([i["peak_bytes"][m] / 2**20 for i in importance])
        rate = [sum(r["train_seconds"][1:]) / max(1, sum(r["train_steps"][1:])) for r in recs]
        summary["train_seconds_per_step"] = metrics.mean_std(rate)
        summary["penalty_overhead"] = None
        summary["penalty_overhead_fused"] = None
        if m in MAS_METHODS:
            timings = [r["penalty_overhead"] for r in recs]
            summary["penalty_overhead"] = metrics.mean_std([t["overhead_autograd"] for t in timings])
            summary["penalty_overhead_fused"] = metrics.mean_std([t["overhead_fused"] for t in timings])
        methods[m] = {
            "summary": summary,
            "acc_matrix_mean": mats.mean(0).tolist(),
            "acc_matrix_std": mats.std(0).tolist(),
            "task1_curve_mean": mats[:, :, 0].mean(0).tolist(),
            "task1_curve_std": mats[:, :, 0].std(0).tolist(),
            "chosen_lam": [r["chosen_lam"] for r in recs],
            "per_seed": recs,
        }
    imp_summary = None
    if importance:
        imp_summary = {"seconds": {}, "peak_mib": {}, "spearman": {}, "spearman_by_type": {}}
        for name in importance[0]["seconds"]:
            imp_summary["seconds"][name] = metrics.mean_std([i["seconds"][name] for i in importance])
            imp_summary["peak_mib"][name] = metrics.mean_std([i["peak_bytes"][name] / 2**20 for i in importance])
        for key in ("spearman", "spearman_by_type"):
            for pair, per_group in importance[0][key].items():
                imp_summary[key][pair] = {g: metrics.mean_std([i[key][pair][g] for i in importance]) for g in per_group}
        imp_summary["spearman_by_type_within"] = within_types(importance)
        imp_summary["labels"] = importance[0]["labels"]
        imp_summary["per_seed"] = [
            {k: i[k] for k in ("seconds", "peak_bytes", "spearman", "spearman_by_type")} for i in importance
        ]
        imp_summary["protocol"] = "model after task 1 (shared by all methods), task-1 training images, per tensor"
    return {
        "config": asdict(cfg),
        "tasks": list(task_names),
        "chance_accuracy": 1.0 / classes_per_task(cfg.benchmark),
        "methods": methods,
        "importance_comparison": imp_summary,
        "metric_definitions": METRIC_DEFINITIONS,
    }


def within_types(importance: list[dict]) -> dict:
    """Per pair and layer type: the mean over the type's tensors of the per-tensor ρ, mean ± std over seeds.

    Beside the pooled ρ (``spearman_by_type``), which also compares the tensors' scales with each other, this
    says whether the estimators rank the entries *within* each tensor alike.
    """
    labels = importance[0]["labels"]
    out: dict[str, dict] = {}
    for pair in importance[0]["spearman"]:
        kinds: dict[str, list[str]] = {}
        for param in importance[0]["spearman"][pair]:
            kinds.setdefault(labels[param]["type"], []).append(param)
        per_kind = {}
        for kind, params in kinds.items():
            seeds = []
            for seed in importance:
                vals = [seed["spearman"][pair][q] for q in params if not math.isnan(seed["spearman"][pair][q])]
                seeds.append(float(np.mean(vals)) if vals else math.nan)
            per_kind[kind] = metrics.mean_std(seeds)
        out[pair] = per_kind
    return out


def environment(cfg: Config) -> dict:
    """Versions, threads, machine load and git commit: what the timings depend on."""
    env = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": cfg.device,
    }
    try:  # other processes on the machine slow the timings down; record how busy it was
        env["load_average_1_5_15"] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass
    import sklearn

    import mas_local

    env["scikit_learn"] = sklearn.__version__
    env["mas_local"] = mas_local.__version__
    if torch.device(cfg.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        env["git_commit"] = proc.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def jsonable(x):
    """``x`` with numpy scalars and arrays as Python values and NaN as ``None`` (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) else v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    return x


MAX_TENSORS_IN_TABLE = 12  # beyond this (the transformer) the table gives ρ per layer type only


def _fmt_pm(ms: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if ms is None or ms["mean"] is None or (isinstance(ms["mean"], float) and math.isnan(ms["mean"])):
        return "-"
    return f"{ms['mean'] * scale:.{digits}f} ± {ms['std'] * scale:.{digits}f}"


def _fmt_lams(chosen: list[list[float | None]]) -> str:
    vals = sorted({v for seed in chosen for v in seed if v is not None})
    if not vals:
        return "-"
    counts = {v: sum(1 for seed in chosen for x in seed if x == v) for v in vals}
    return " ".join(f"{v:g}×{counts[v]}" for v in vals)


def _fmt_overhead(s: dict) -> str:
    text = _fmt_pm(s["penalty_overhead"], 100.0, 0)
    if s.get("penalty_overhead_fused"):
        text += " / " + _fmt_pm(s["penalty_overhead_fused"], 100.0, 0)
    return text


def short_label(param: str, labels: dict[str, dict[str, str]] | None) -> str:
    """``layer 1 weight`` for ``body.0.weight`` (the parameter's own name when no label is known)."""
    lab = (labels or {}).get(param)
    return f"{lab['layer']} {lab['tensor']}" if lab else param


def table(results: dict) -> str:
    """The terminal table: one line per method, then the run's settings and the global/local agreement."""
    head = [
        "method",
        "avg acc %",
        "BWT %",
        "forgetting %",
        "Ω s/task",
        "Ω peak MiB",
        "penalty +% (autograd/fused)",
        "chosen λ (×count)",
    ]
    rows = []
    for m, r in results["methods"].items():
        s = r["summary"]
        rows.append(
            [
                m,
                _fmt_pm(s["avg_acc"]),
                _fmt_pm(s["bwt"]),
                _fmt_pm(s["forgetting"]),
                _fmt_pm(s.get("importance_seconds_per_task"), 1.0, 3),
                _fmt_pm(s.get("importance_peak_mib"), 1.0, 2),
                _fmt_overhead(s),
                _fmt_lams(r["chosen_lam"]),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]
    cfg = results["config"]
    out.append(
        f"{cfg['benchmark']} digits, {cfg['tasks']} tasks, {cfg['model']}, {cfg['epochs']} epochs/task, "
        f"{cfg['seeds']} seed(s); mean ± std over seeds; λ picked per task on validation of seen tasks"
    )
    imp = results.get("importance_comparison")
    if imp:
        pair = "global-sample vs local-hebbian"
        vals = imp["spearman"].get(pair, {})
        if vals and len(vals) <= MAX_TENSORS_IN_TABLE:
            labels = imp.get("labels")
            cells = ", ".join(
                f"{short_label(p, labels)} {v['mean']:.2f}" for p, v in vals.items() if v["mean"] is not None
            )
            out.append(f"Spearman ρ(Ω) {pair} after task 1, per tensor: {cells}")
        by_type = imp.get("spearman_by_type", {}).get(pair, {})
        if by_type:
            cells = ", ".join(f"{kind} {_fmt_pm(v, 1.0, 2)}" for kind, v in by_type.items())
            out.append(f"Spearman ρ(Ω) {pair} after task 1, per layer type (pooled): {cells}")
        within = imp.get("spearman_by_type_within", {}).get(pair, {})
        if within:
            cells = ", ".join(f"{kind} {_fmt_pm(v, 1.0, 2)}" for kind, v in within.items())
            out.append(f"Spearman ρ(Ω) {pair} after task 1, per layer type (mean within tensors): {cells}")
    return "\n".join(out)
