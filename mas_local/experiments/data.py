"""The task sequences: scikit-learn's digits split per seed, then permuted, split or rotated.

See docs/compare.md ("What is compared") for the benchmarks in words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

BENCHMARKS = ("permuted", "split", "rotated")
SPLIT_MAX_TASKS = 5  # ten digits in pairs


def classes_per_task(benchmark: str) -> int:
    """Classes a task's head chooses from: 2 for ``split`` (one 2-way head per task), else 10."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
    return 2 if benchmark == "split" else 10


@dataclass
class Task:
    """One task: inputs ``[N, 64]`` and labels per split; ``head`` is the task id for multi-head."""

    name: str
    x: dict[str, Tensor]
    y: dict[str, Tensor]
    head: int | None = None


@dataclass
class Splits:
    """One seed's train / val / test split of the raw digits and the training split's scale."""

    x: dict[str, np.ndarray]  # raw pixels 0..16, [N, 64]
    y: dict[str, np.ndarray]
    mean: float
    std: float


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
    train = x[parts["train"]]
    return Splits(
        x={k: x[v] for k, v in parts.items()},
        y={k: y[v] for k, v in parts.items()},
        mean=float(train.mean()),
        std=float(train.std()),
    )


def rotate(x: np.ndarray, degrees: float) -> np.ndarray:
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
                xs[k], ys[k] = scale(rotate(s.x[k], deg)), torch.from_numpy(s.y[k]).to(device)
        elif benchmark == "split":
            c0, c1 = 2 * t, 2 * t + 1
            name = f"digits {c0}/{c1}"
            head = t
            for k in s.x:
                keep = (s.y[k] == c0) | (s.y[k] == c1)
                xs[k] = scale(s.x[k][keep])
                ys[k] = torch.from_numpy((s.y[k][keep] == c1).astype(np.int64)).to(device)
        else:
            raise ValueError(f"unknown benchmark {benchmark!r}; choose from {', '.join(BENCHMARKS)}")
        tasks.append(Task(name=name, x=xs, y=ys, head=head))
    return tasks


def task_ids(task: Task, split: str) -> Tensor:
    """The head index of every sample of ``split`` (0 for a shared head), as a long tensor."""
    x = task.x[split]
    return torch.full((x.shape[0],), task.head if task.head is not None else 0, dtype=torch.long, device=x.device)


def importance_batches(task: Task, batch_size: int) -> list[Tensor]:
    """The task's training images in order, as the list of batches ``consolidate`` reads."""
    x = task.x["train"]
    return [x[i : i + batch_size] for i in range(0, x.shape[0], batch_size)]
