"""``mas-local compare``: global vs local MAS on a task sequence built from real digits.

Data
    scikit-learn's handwritten digits (``load_digits``: 1797 real 8×8 scans, bundled
    with scikit-learn, no download). For each seed the images are split once,
    stratified by class, into train / validation / test (60 / 20 / 20 %) and scaled
    by one scalar mean and standard deviation taken from that seed's training split.

Benchmarks (task sequences built from those splits)
    ``permuted``  task ``t`` applies a fixed random pixel permutation (task 1 keeps the
                  original pixel order); one shared 10-way head. Default, 5 tasks.
    ``split``     task ``t`` is the class pair ``(2t, 2t+1)`` with its own 2-way head
                  (multi-head: the task id selects the head at train and test time).
                  At most 5 tasks.
    ``rotated``   task ``t`` rotates every image by an angle evenly spaced in
                  [0°, 90°] (bilinear, zero fill); one shared 10-way head.

Models
    ``mlp``  64 → 256 → 256 → head, ReLU (default; the width is ``HIDDEN``).
    ``cnn``  conv 1→16 3×3 → conv 16→32 3×3 stride 2 → linear 512 → 256 → head, ReLU.
    The multi-head output of ``split`` is one :class:`MultiHead` module whose forward
    returns only the active task's two logits while importance is estimated, so the
    importance (global or local) of a head row comes from its own task only.

Methods
    ``finetune``       plain sequential training (the lower bound).
    ``joint``          at task ``t`` trains on the union of the training sets of tasks
                       ``1..t``, continuing from the previous model (the upper bound).
    ``global-sample``  MAS, ``mode="global", estimator="sample"`` (the paper's Ω).
    ``global-batch``   MAS, ``mode="global", estimator="batch"`` (official code, Avalanche).
    ``local-hebbian``  MAS, ``mode="local", estimator="hebbian"`` (ℓ-MAS, forward only).
    ``local-sample``   MAS, ``mode="local", estimator="sample"``.
    Every method starts each seed from the same initial weights, and the first task is
    trained once per seed and shared (all methods do the same thing on it). Each task
    is trained for ``--epochs`` epochs of Adam (lr 1e-3, batch 32, a fresh optimizer per
    task, the same shuffling for every method and λ). After each task a MAS method
    calls ``mas.consolidate`` on that task's training images (labels unused), which
    adds the task's Ω to the running sum (``accumulate="sum"``) and stores θ*.

λ selection (the protocol)
    The MAS object is built with ``lam=1`` and the training loss is
    ``task_loss + λ · mas.penalty()``, so λ scales the penalty exactly as the ``lam``
    argument would. Before each task ``t ≥ 2`` the model is snapshotted; for every λ of
    ``--lam-grid`` the task is trained from that snapshot and scored by the mean
    *validation* accuracy over tasks ``1..t`` (the tasks seen so far; no test data and
    no future task is looked at). The best λ's weights are kept and the sequence goes
    on from them; ties go to the smaller λ. So λ is chosen greedily per task and per
    seed, and ``results.json`` lists the choice for every task and seed together with
    every candidate's validation score. Test accuracies are measured only on the
    kept model. Task 1 has no penalty, so no λ is chosen there.

Metrics (mean ± std over ``--seeds``; std is the population std, ddof 0)
    The accuracy matrix ``R[i, j]`` (test accuracy on task ``j`` after training task
    ``i``), average accuracy after the last task, backward transfer
    ``BWT = mean_j (R[T, j] − R[j, j])`` and forgetting
    ``mean_j max_{l<T} R[l, j] − R[T, j]`` (see :mod:`mas_local.metrics`), the seconds
    spent in ``consolidate`` (importance estimation), and the penalty overhead: the
    fastest time of a training step with the penalty over one without, minus one,
    timed by interleaving both on one batch after the last task (for the autograd
    ``mas.penalty()`` and for the fused ``mas.add_penalty_grad_()``).
    Global and local importance are compared on the model after task 1: all four
    estimators are computed with ``compute_importance`` on the task-1 training images
    and compared per parameter tensor by Spearman rank correlation; the histograms of
    log10 Ω are plotted.

Outputs in ``--out``: ``results.json`` (every number, the configuration and the
environment), ``accuracy_matrices.png``, ``task1_accuracy.png`` and
``importance_global_vs_local.png``; a table goes to the terminal.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import metrics

METHODS = ("finetune", "joint", "global-sample", "global-batch", "local-hebbian", "local-sample")
MAS_METHODS = {
    "global-sample": ("global", "sample"),
    "global-batch": ("global", "batch"),
    "local-hebbian": ("local", "hebbian"),
    "local-sample": ("local", "sample"),
}
BENCHMARKS = ("permuted", "split", "rotated")
MODELS = ("mlp", "cnn")
DEFAULT_LAM_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)
SPLIT_MAX_TASKS = 5
HIDDEN = 256  # width of the hidden layers (mlp) and of the cnn's linear layer
ESTIMATOR_PAIRS = (
    ("global-sample", "local-hebbian"),
    ("global-sample", "local-sample"),
    ("global-sample", "global-batch"),
    ("local-hebbian", "local-sample"),
)


@dataclass
class Config:
    seeds: int = 3
    tasks: int = 5
    epochs: int = 5
    model: str = "mlp"
    benchmark: str = "permuted"
    lam_grid: tuple[float, ...] = DEFAULT_LAM_GRID
    methods: tuple[str, ...] = METHODS
    out: str = "runs/compare"
    device: str = "cpu"
    batch_size: int = 32
    lr: float = 1e-3
    importance_batch_size: int = 128
    threads: int = 1
    quiet: bool = False
    plots: bool = True

    def validate(self) -> None:
        """Raise ``ValueError`` with a readable message for any bad setting."""
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        if self.tasks < 2:
            raise ValueError(f"--tasks must be at least 2 (a continual-learning sequence), got {self.tasks}")
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; choose from {', '.join(BENCHMARKS)}")
        if self.benchmark == "split" and self.tasks > SPLIT_MAX_TASKS:
            raise ValueError(
                f"--benchmark split has at most {SPLIT_MAX_TASKS} tasks (10 digits in pairs), got {self.tasks}"
            )
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose from {', '.join(MODELS)}")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be at least 1, got {self.epochs}")
        if not self.methods:
            raise ValueError("--methods is empty")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {','.join(self.methods)}")
        if not self.lam_grid:
            raise ValueError("--lam-grid is empty")
        for lam in self.lam_grid:
            if not math.isfinite(lam) or lam < 0:
                raise ValueError(f"--lam-grid values must be finite and >= 0, got {lam}")
        if len(set(self.lam_grid)) != len(self.lam_grid):
            raise ValueError("--lam-grid lists a value twice")
        if self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.batch_size < 1 or self.importance_batch_size < 1:
            raise ValueError("batch sizes must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be positive, got {self.lr}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, ValueError):
            dev = None
        if dev is None or dev.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was asked for but torch sees no CUDA GPU (torch.cuda.is_available() is False)"
            )


# --------------------------------------------------------------------------- data


@dataclass
class Task:
    """One task: inputs ``[N, 64]`` and labels per split; ``head`` is the task id for multi-head."""

    index: int
    name: str
    x: dict[str, Tensor]
    y: dict[str, Tensor]
    head: int | None = None


@dataclass
class Splits:
    x: dict[str, np.ndarray]  # raw pixels 0..16, [N, 64]
    y: dict[str, np.ndarray]
    mean: float = 0.0
    std: float = 1.0
    indices: dict[str, list[int]] = field(default_factory=dict)


def load_splits(seed: int) -> Splits:
    """Stratified 60/20/20 train/val/test split of ``load_digits`` for one seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    i_train, i_rest = train_test_split(idx, test_size=0.4, random_state=seed, stratify=y)
    i_val, i_test = train_test_split(i_rest, test_size=0.5, random_state=seed, stratify=y[i_rest])
    parts = {"train": np.sort(i_train), "val": np.sort(i_val), "test": np.sort(i_test)}
    s = Splits(x={k: x[v] for k, v in parts.items()}, y={k: y[v] for k, v in parts.items()})
    s.mean = float(s.x["train"].mean())
    s.std = float(s.x["train"].std())
    s.indices = {k: v.tolist() for k, v in parts.items()}
    return s


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate ``[N, 64]`` images (as 8×8) by ``degrees`` counter-clockwise, bilinear, zero fill."""
    if degrees == 0:
        return x.copy()
    a = math.radians(degrees)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=torch.float32)
    imgs = torch.from_numpy(x).view(-1, 1, 8, 8)
    grid = F.affine_grid(theta.expand(imgs.shape[0], 2, 3), list(imgs.shape), align_corners=False)
    out = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(-1, 64).numpy()


def make_tasks(benchmark: str, n_tasks: int, seed: int, device: torch.device | str = "cpu") -> list[Task]:
    """Build the task sequence of ``benchmark`` for ``seed`` (deterministic)."""
    s = load_splits(seed)
    rng = np.random.default_rng(seed + 7919)
    tasks: list[Task] = []

    def scale(a: np.ndarray) -> Tensor:
        return torch.from_numpy(((a - s.mean) / s.std).astype(np.float32)).to(device)

    for t in range(n_tasks):
        xs, ys, head = {}, {}, None
        if benchmark == "permuted":
            perm = np.arange(64) if t == 0 else rng.permutation(64)
            name = "original" if t == 0 else f"permutation {t}"
            for k in s.x:
                xs[k], ys[k] = scale(s.x[k][:, perm]), torch.from_numpy(s.y[k]).to(device)
        elif benchmark == "rotated":
            deg = 90.0 * t / (n_tasks - 1)
            name = f"rotated {deg:g}°"
            for k in s.x:
                xs[k], ys[k] = scale(_rotate(s.x[k], deg)), torch.from_numpy(s.y[k]).to(device)
        elif benchmark == "split":
            c0, c1 = 2 * t, 2 * t + 1
            name = f"digits {c0}/{c1}"
            head = t
            for k in s.x:
                keep = (s.y[k] == c0) | (s.y[k] == c1)
                xs[k] = scale(s.x[k][keep])
                ys[k] = torch.from_numpy((s.y[k][keep] == c1).astype(np.int64)).to(device)
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}")
        tasks.append(Task(index=t, name=name, x=xs, y=ys, head=head))
    return tasks


# --------------------------------------------------------------------------- models


class MultiHead(nn.Module):
    """``n_heads`` linear heads of ``n_classes`` outputs in one weight matrix.

    With ``active = None`` the forward returns all heads' logits ``[B, n_heads·n_classes]``
    (training and evaluation pick each sample's head from that); with ``active = t`` it
    returns only head ``t``'s logits, which is how importance is estimated for task ``t``.
    """

    def __init__(self, in_features: int, n_heads: int, n_classes: int):
        super().__init__()
        ref = nn.Linear(in_features, n_heads * n_classes)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.n_heads, self.n_classes = n_heads, n_classes
        self.active: int | None = None

    def forward(self, h: Tensor) -> Tensor:
        if self.active is None:
            return F.linear(h, self.weight, self.bias)
        sl = slice(self.active * self.n_classes, (self.active + 1) * self.n_classes)
        return F.linear(h, self.weight[sl], self.bias[sl])


class Net(nn.Module):
    """A body (``nn.Sequential``) and a head (shared ``nn.Linear`` or :class:`MultiHead`)."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_model(kind: str, n_heads: int | None, n_classes: int) -> Net:
    """``mlp`` or ``cnn`` on ``[N, 64]`` inputs; ``n_heads`` set means a :class:`MultiHead`."""
    if kind == "mlp":
        body = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
    elif kind == "cnn":
        body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, HIDDEN),
            nn.ReLU(),
        )
    else:
        raise ValueError(f"unknown model {kind!r}")
    head = nn.Linear(HIDDEN, n_classes) if n_heads is None else MultiHead(HIDDEN, n_heads, n_classes)
    return Net(body, head)


def _logits(model: Net, x: Tensor, task_ids: Tensor | None) -> Tensor:
    out = model(x)
    head = model.head
    if isinstance(head, MultiHead) and head.active is None:
        out = out.view(out.shape[0], head.n_heads, head.n_classes)
        out = out[torch.arange(out.shape[0], device=out.device), task_ids]
    return out


# --------------------------------------------------------------------------- training


def _seed_for(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def train(
    model: Net,
    x: Tensor,
    y: Tensor,
    task_ids: Tensor,
    cfg: Config,
    shuffle_seed: int,
    penalty: Callable[[], Tensor] | None = None,
    lam: float = 0.0,
) -> tuple[float, int]:
    """Train for ``cfg.epochs`` epochs; returns (seconds, optimizer steps)."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(shuffle_seed)
    n = x.shape[0]
    steps = 0
    sync = x.device.type == "cuda"
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(_logits(model, x[idx], task_ids[idx]), y[idx])
            if penalty is not None and lam != 0.0:
                loss = loss + lam * penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, steps


@torch.no_grad()
def accuracy(model: Net, task: Task, split: str) -> float:
    model.eval()
    x, y = task.x[split], task.y[split]
    ids = torch.full((x.shape[0],), task.head if task.head is not None else 0, device=x.device)
    pred = _logits(model, x, ids).argmax(1)
    model.train()
    return float((pred == y).float().mean())


def _task_ids(task: Task, split: str) -> Tensor:
    x = task.x[split]
    return torch.full((x.shape[0],), task.head if task.head is not None else 0, dtype=torch.long, device=x.device)


def importance_batches(task: Task, batch_size: int) -> list[Tensor]:
    """The task's training images in order, as the list of batches ``consolidate`` reads."""
    x = task.x["train"]
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]


class _ActiveHead:
    """Context manager: the multi-head model outputs only ``task``'s head inside."""

    def __init__(self, model: Net, task: Task):
        self.head = model.head if isinstance(model.head, MultiHead) else None
        self.task = task

    def __enter__(self):
        if self.head is not None:
            self.head.active = self.task.head
        return self

    def __exit__(self, *exc):
        if self.head is not None:
            self.head.active = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def make_mas(model: Net, method: str):
    """The library's MAS object for ``method`` (``lam=1``: λ multiplies the penalty in the loss)."""
    import mas_local as ml

    mode, estimator = MAS_METHODS[method]
    return ml.MAS(model, lam=1.0, mode=mode, estimator=estimator, accumulate="sum", progress=False)


def measure_penalty_overhead(model: Net, mas, task: Task, cfg: Config, steps: int = 40) -> dict[str, float]:
    """Fastest seconds of one training step without and with the penalty, interleaved on one batch.

    Two penalty paths are timed: the differentiable ``mas.penalty()`` added to the loss
    (what the comparison trains with) and the fused ``mas.add_penalty_grad_()`` after
    ``backward``. The model's weights are restored afterwards.
    """
    device = torch.device(cfg.device)
    snapshot = _state(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    n = min(cfg.batch_size, task.x["train"].shape[0])
    x, y, ids = task.x["train"][:n], task.y["train"][:n], _task_ids(task, "train")[:n]
    times: dict[str, list[float]] = {"plain": [], "autograd": [], "fused": []}
    fused = hasattr(mas, "add_penalty_grad_")
    model.train()
    for i in range(steps + 2):
        for kind in ("plain", "autograd", "fused"):
            if kind == "fused" and not fused:
                continue
            _sync(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(_logits(model, x, ids), y)
            if kind == "autograd":
                loss = loss + mas.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if kind == "fused":
                mas.add_penalty_grad_()
            opt.step()
            _sync(device)
            if i >= 2:  # warm-up
                times[kind].append(time.perf_counter() - t0)
    model.load_state_dict(snapshot)
    # the minimum over repeats: the least disturbed by other processes on a shared CPU
    med = {k: float(np.min(v)) for k, v in times.items() if v}
    out = {f"step_seconds_{k}": v for k, v in med.items()}
    out.update({f"step_seconds_{k}_median": float(np.median(v)) for k, v in times.items() if v})
    out["overhead_autograd"] = med["autograd"] / med["plain"] - 1.0
    if "fused" in med:
        out["overhead_fused"] = med["fused"] / med["plain"] - 1.0
    return out


def run_method(
    method: str,
    tasks: list[Task],
    cfg: Config,
    seed: int,
    after_first: dict[str, Tensor],
    first_seconds: tuple[float, int],
    progress=None,
) -> dict:
    """Run ``method`` over the sequence from the shared after-task-1 weights; returns its record."""
    device = torch.device(cfg.device)
    n_tasks = len(tasks)
    n_heads = n_tasks if tasks[0].head is not None else None
    model = build_model(cfg.model, n_heads, 2 if n_heads else 10).to(device)
    model.load_state_dict(after_first)
    acc = np.full((n_tasks, n_tasks), np.nan)
    chosen: list[float | None] = [None] * n_tasks
    candidates: list[dict[str, float] | None] = [None] * n_tasks
    consolidate_seconds: list[float] = []
    train_seconds = [first_seconds[0]] + [0.0] * (n_tasks - 1)
    train_steps = [first_seconds[1]] + [0] * (n_tasks - 1)
    mas = make_mas(model, method) if method in MAS_METHODS else None

    def consolidate(task: Task) -> None:
        data = importance_batches(task, cfg.importance_batch_size)
        _sync(device)
        t0 = time.perf_counter()
        with _ActiveHead(model, task):
            mas.consolidate(data)
        _sync(device)
        consolidate_seconds.append(time.perf_counter() - t0)

    for j, task in enumerate(tasks):
        acc[0, j] = accuracy(model, task, "test")
    if mas is not None:
        consolidate(tasks[0])

    for t in range(1, n_tasks):
        task = tasks[t]
        shuffle_seed = _seed_for(seed, t)
        if method == "joint":
            seen = tasks[: t + 1]
            x = torch.cat([s.x["train"] for s in seen])
            y = torch.cat([s.y["train"] for s in seen])
            ids = torch.cat([_task_ids(s, "train") for s in seen])
        else:
            x, y, ids = task.x["train"], task.y["train"], _task_ids(task, "train")
        if mas is None:
            secs, steps = train(model, x, y, ids, cfg, shuffle_seed)
            train_seconds[t], train_steps[t] = secs, steps
            if progress is not None:
                progress.update(1)
        else:
            snapshot = _state(model)
            best: tuple[float, float, dict[str, Tensor]] | None = None
            scores: dict[str, float] = {}
            for lam in sorted(cfg.lam_grid):
                model.load_state_dict(snapshot)
                secs, steps = train(model, x, y, ids, cfg, shuffle_seed, penalty=mas.penalty, lam=lam)
                train_seconds[t] += secs
                train_steps[t] += steps
                score = float(np.mean([accuracy(model, s, "val") for s in tasks[: t + 1]]))
                scores[repr(lam)] = score
                if best is None or score > best[0]:
                    best = (score, lam, _state(model))
                if progress is not None:
                    progress.update(1)
            assert best is not None
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


def compare_importance(model: Net, task: Task, cfg: Config) -> dict:
    """All four estimators on one model and task; Spearman per parameter for :data:`ESTIMATOR_PAIRS`."""
    import mas_local as ml

    device = torch.device(cfg.device)
    data = importance_batches(task, cfg.importance_batch_size)
    omegas: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    for name, (mode, estimator) in MAS_METHODS.items():
        _sync(device)
        t0 = time.perf_counter()
        with _ActiveHead(model, task):
            imp = ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False)
        _sync(device)
        seconds[name] = time.perf_counter() - t0
        omegas[name] = {k: v.detach().float().cpu().numpy().ravel() for k, v in imp.items()}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rho: dict[str, dict[str, float]] = {}
    for a, b in ESTIMATOR_PAIRS:
        key = f"{a} vs {b}"
        rho[key] = {n: metrics.spearman(omegas[a][n], omegas[b][n]) for n in names if n in omegas[a] and n in omegas[b]}
    return {"seconds": seconds, "spearman": rho, "omegas": omegas, "params": names}


# --------------------------------------------------------------------------- whole run


def _environment(cfg: Config) -> dict:
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
    try:
        import sklearn

        env["scikit_learn"] = sklearn.__version__
    except Exception:  # pragma: no cover - sklearn is required to get here
        pass
    try:
        import mas_local

        env["mas_local"] = getattr(mas_local, "__version__", "?")
    except Exception:  # pragma: no cover
        pass
    if torch.device(cfg.device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(cfg.device))
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except Exception:
        env["git_commit"] = None
    return env


def _check_core() -> None:
    import mas_local as ml

    missing = [n for n in ("MAS", "compute_importance") if not hasattr(ml, n)]
    if missing:
        raise RuntimeError(
            f"this mas_local has no {', '.join(missing)}: the core library is missing; only finetune and joint can run"
        )


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

    uses_mas = any(m in MAS_METHODS for m in cfg.methods)
    if uses_mas:
        _check_core()
    device = torch.device(cfg.device)
    start = time.perf_counter()
    per_units = sum(len(cfg.lam_grid) if m in MAS_METHODS else 1 for m in cfg.methods) * (cfg.tasks - 1) + 1
    progress = tqdm(
        total=cfg.seeds * per_units, desc="compare", unit="task", disable=True if cfg.quiet else None, leave=False
    )
    records: dict[str, list[dict]] = {m: [] for m in cfg.methods}
    importance: list[dict] = []
    task_names: list[str] = []
    for seed in range(cfg.seeds):
        tasks = make_tasks(cfg.benchmark, cfg.tasks, seed, device)
        task_names = [t.name for t in tasks]
        n_heads = cfg.tasks if tasks[0].head is not None else None
        torch.manual_seed(seed)
        model = build_model(cfg.model, n_heads, 2 if n_heads else 10).to(device)
        progress.set_postfix_str(f"seed {seed} task 1")
        t0 = tasks[0]
        first = train(model, t0.x["train"], t0.y["train"], _task_ids(t0, "train"), cfg, _seed_for(seed, 0))
        progress.update(1)
        after_first = _state(model)
        if uses_mas:
            importance.append(compare_importance(model, tasks[0], cfg))
        for method in cfg.methods:
            progress.set_postfix_str(f"seed {seed} {method}")
            records[method].append(run_method(method, tasks, cfg, seed, after_first, first, progress))
    progress.close()
    results = aggregate(cfg, records, importance, task_names)
    results["environment"] = _environment(cfg)
    results["wall_seconds"] = time.perf_counter() - start
    os.makedirs(cfg.out, exist_ok=True)
    results["plots"] = []
    if cfg.plots:
        from . import plots

        results["plots"] = plots.write_all(results, importance, cfg.out)
    results = _jsonable(results)
    with open(os.path.join(cfg.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return None if math.isnan(v) else v
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def aggregate(cfg: Config, records: dict[str, list[dict]], importance: list[dict], task_names: Sequence[str]) -> dict:
    """Mean ± std over seeds of every metric; chosen λ; timings; importance correlations."""
    methods: dict[str, dict] = {}
    for m, recs in records.items():
        mats = np.array([r["acc_matrix"] for r in recs])
        summary = {k: metrics.mean_std([r["metrics"][k] for r in recs]) for k in recs[0]["metrics"]}
        summary["importance_seconds"] = metrics.mean_std([r["importance_seconds"] for r in recs])
        rate = [sum(r["train_seconds"][1:]) / max(1, sum(r["train_steps"][1:])) for r in recs]
        summary["train_seconds_per_step"] = metrics.mean_std(rate)
        summary["penalty_overhead"] = None
        summary["penalty_overhead_fused"] = None
        if m in MAS_METHODS:
            summary["penalty_overhead"] = metrics.mean_std([r["penalty_overhead"]["overhead_autograd"] for r in recs])
            if all("overhead_fused" in r["penalty_overhead"] for r in recs):
                summary["penalty_overhead_fused"] = metrics.mean_std(
                    [r["penalty_overhead"]["overhead_fused"] for r in recs]
                )
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
        imp_summary = {"seconds": {}, "spearman": {}}
        for name in importance[0]["seconds"]:
            imp_summary["seconds"][name] = metrics.mean_std([i["seconds"][name] for i in importance])
        for pair, per_param in importance[0]["spearman"].items():
            imp_summary["spearman"][pair] = {
                p: metrics.mean_std([i["spearman"][pair][p] for i in importance]) for p in per_param
            }
        imp_summary["per_seed"] = [{"seconds": i["seconds"], "spearman": i["spearman"]} for i in importance]
        imp_summary["protocol"] = "model after task 1 (shared by all methods), task-1 training images, per tensor"
    return {
        "config": asdict(cfg),
        "tasks": list(task_names),
        "methods": methods,
        "importance_comparison": imp_summary,
        "metric_definitions": {
            "acc_matrix": "R[i][j] = test accuracy on task j after training tasks 1..i+1",
            "avg_acc": "mean_j R[T-1][j]",
            "bwt": "mean_{j<T-1} (R[T-1][j] - R[j][j])",
            "forgetting": "mean_{j<T-1} (max_{j<=l<T-1} R[l][j] - R[T-1][j])",
            "learning_acc": "mean_j R[j][j]",
            "importance_seconds": "seconds inside mas.consolidate over the whole sequence",
            "penalty_overhead": "fastest step seconds with loss + mas.penalty() / without - 1 (interleaved, one batch)",
            "penalty_overhead_fused": "same with mas.add_penalty_grad_() after backward instead of penalty()",
            "train_seconds_per_step": "training seconds / optimizer steps on tasks >= 2 (all lambda candidates)",
            "std": "population std over seeds (ddof=0)",
        },
    }


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


def table(results: dict) -> str:
    """The terminal table: one line per method."""
    head = [
        "method",
        "avg acc %",
        "BWT %",
        "forgetting %",
        "Ω time s",
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
                _fmt_pm(s["importance_seconds"], 1.0, 2) if m in MAS_METHODS else "-",
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
        if vals:
            cells = ", ".join(f"{p} {v['mean']:.2f}" for p, v in vals.items() if v["mean"] is not None)
            out.append(f"Spearman ρ(Ω) {pair} after task 1: {cells}")
    return "\n".join(out)
