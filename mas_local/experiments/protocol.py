"""The whole comparison: seeds, the shared first task, every method over the sequence, λ per task.

The protocol in words is the package docstring (:mod:`mas_local.experiments`) and
docs/compare.md ("How λ is chosen").
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch
from torch import Tensor

from . import metrics, plots
from .config import MAS_METHODS, Config
from .data import Task, importance_batches, make_tasks, task_ids
from .importance_agreement import compare_estimators
from .models import ActiveHead, Net, build_model
from .report import aggregate, environment, jsonable
from .training import accuracy, derive_seed, measure_penalty_overhead, snapshot, synchronize, train


def make_mas(model: Net, method: str):
    """The library's MAS object for ``method`` (``lam=1``: λ multiplies the penalty in the loss)."""
    import mas_local as ml

    mode, estimator = MAS_METHODS[method]
    return ml.MAS(model, lam=1.0, mode=mode, estimator=estimator, accumulate="sum", progress=False)


def _build(cfg: Config, n_tasks: int, multi_head: bool) -> Net:
    n_heads = n_tasks if multi_head else None
    return build_model(cfg.model, n_heads, 2 if n_heads else 10).to(torch.device(cfg.device))


def run_method(
    method: str,
    tasks: list[Task],
    cfg: Config,
    seed: int,
    after_first: dict[str, Tensor],
    first_task_time: tuple[float, int],
    progress=None,
) -> dict:
    """Run ``method`` over the sequence from the shared after-task-1 weights; returns its record.

    ``first_task_time`` is (seconds, optimizer steps) of the shared first task. A MAS method
    trains each later task once per λ of ``cfg.lam_grid`` from the same snapshot and keeps
    the candidate with the best mean validation accuracy over the tasks seen so far.
    """
    device = torch.device(cfg.device)
    n_tasks = len(tasks)
    model = _build(cfg, n_tasks, tasks[0].head is not None)
    model.load_state_dict(after_first)
    acc = np.full((n_tasks, n_tasks), np.nan)
    chosen: list[float | None] = [None] * n_tasks
    candidates: list[dict[str, float] | None] = [None] * n_tasks
    consolidate_seconds: list[float] = []
    train_seconds = [first_task_time[0]] + [0.0] * (n_tasks - 1)
    train_steps = [first_task_time[1]] + [0] * (n_tasks - 1)
    mas = make_mas(model, method) if method in MAS_METHODS else None

    def consolidate(task: Task) -> None:
        data = importance_batches(task, cfg.importance_batch_size)
        synchronize(device)
        t0 = time.perf_counter()
        with ActiveHead(model, task.head):
            mas.consolidate(data)
        synchronize(device)
        consolidate_seconds.append(time.perf_counter() - t0)

    for j, task in enumerate(tasks):
        acc[0, j] = accuracy(model, task, "test")
    if mas is not None:
        consolidate(tasks[0])

    for t in range(1, n_tasks):
        task = tasks[t]
        shuffle_seed = derive_seed(seed, t)
        if method == "joint":
            seen = tasks[: t + 1]
            x = torch.cat([s.x["train"] for s in seen])
            y = torch.cat([s.y["train"] for s in seen])
            ids = torch.cat([task_ids(s, "train") for s in seen])
        else:
            x, y, ids = task.x["train"], task.y["train"], task_ids(task, "train")
        if mas is None:
            train_seconds[t], train_steps[t] = train(model, x, y, ids, cfg, shuffle_seed)
            if progress is not None:
                progress.update(1)
        else:
            before = snapshot(model)
            best: tuple[float, float, dict[str, Tensor]] | None = None
            scores: dict[str, float] = {}
            for lam in sorted(cfg.lam_grid):
                model.load_state_dict(before)
                secs, steps = train(model, x, y, ids, cfg, shuffle_seed, penalty=mas.penalty, lam=lam)
                train_seconds[t] += secs
                train_steps[t] += steps
                score = float(np.mean([accuracy(model, s, "val") for s in tasks[: t + 1]]))
                scores[repr(lam)] = score
                if best is None or score > best[0]:  # strict: ties keep the smaller λ
                    best = (score, lam, snapshot(model))
                if progress is not None:
                    progress.update(1)
            model.load_state_dict(best[2])
            chosen[t], candidates[t] = best[1], scores
            consolidate(task)
        for j, other in enumerate(tasks):
            acc[t, j] = accuracy(model, other, "test")
    overhead = measure_penalty_overhead(model, mas, tasks[-1], cfg) if mas is not None else None

    return {
        "seed": seed,
        "acc_matrix": acc.tolist(),
        "metrics": metrics.summarize(acc),
        "chosen_lam": chosen,
        "lam_val_scores": candidates,
        "consolidate_seconds": consolidate_seconds,
        "importance_seconds": float(sum(consolidate_seconds)),
        "train_seconds": train_seconds,
        "train_steps": train_steps,
        "penalty_overhead": overhead,
    }


def run(cfg: Config) -> dict:
    """Run the whole comparison; returns the results dict (also written to ``cfg.out``).

    Torch runs with ``cfg.threads`` intra-op threads meanwhile (restored afterwards):
    the models are tiny, and one thread is the fastest on a small shared CPU.
    """
    cfg.validate()
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config) -> dict:
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    start = time.perf_counter()
    # progress units: the shared first task, then one per training run of a later task (each λ counts)
    per_seed = sum(len(cfg.lam_grid) if m in MAS_METHODS else 1 for m in cfg.methods) * (cfg.tasks - 1) + 1
    progress = tqdm(
        total=cfg.seeds * per_seed, desc="compare", unit="task", disable=True if cfg.quiet else None, leave=False
    )
    records: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    importance: list[dict] = []
    task_names: list[str] = []
    for seed in range(cfg.seeds):
        tasks = make_tasks(cfg.benchmark, cfg.tasks, seed, device)
        task_names = [t.name for t in tasks]
        torch.manual_seed(seed)
        model = _build(cfg, cfg.tasks, tasks[0].head is not None)
        progress.set_postfix_str(f"seed {seed} task 1")
        first = tasks[0]
        first_time = train(
            model, first.x["train"], first.y["train"], task_ids(first, "train"), cfg, derive_seed(seed, 0)
        )
        progress.update(1)
        after_first = snapshot(model)
        if cfg.uses_mas():
            importance.append(compare_estimators(model, first, cfg))
        for method in cfg.methods:
            progress.set_postfix_str(f"seed {seed} {method}")
            records[method].append(run_method(method, tasks, cfg, seed, after_first, first_time, progress))
    progress.close()
    results = aggregate(cfg, records, importance, task_names)
    results["environment"] = environment(cfg)
    results["wall_seconds"] = time.perf_counter() - start
    os.makedirs(cfg.out, exist_ok=True)
    results["plots"] = []
    if cfg.plots:
        results["plots"] = plots.write_all(results, importance, cfg.out)
    results = jsonable(results)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    return results
