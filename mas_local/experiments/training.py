"""Training one task, test/validation accuracy, and the timing of the MAS penalty's step overhead."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .data import Task, task_ids
from .models import Net, logits


def derive_seed(*parts: int) -> int:
    """A shuffling seed from integers (seed, task, ...): FNV-1a style, stable across runs and platforms."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFF)) * 1099511628211) % (1 << 61)
    return h


def synchronize(device: torch.device) -> None:
    """Wait for the GPU before reading a clock (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of the model's state dict."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(
    model: Net,
    x: Tensor,
    y: Tensor,
    ids: Tensor,
    cfg: Config,
    shuffle_seed: int,
    penalty: Callable[[], Tensor] | None = None,
    lam: float = 0.0,
) -> tuple[float, int]:
    """Train for ``cfg.epochs`` epochs of Adam on ``(x, y)`` (heads ``ids``); returns (seconds, optimizer steps).

    With ``penalty`` and ``lam != 0`` the loss is ``cross_entropy + lam * penalty()``.
    """
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)  # one fused update: faster on CPU too
    gen = torch.Generator().manual_seed(shuffle_seed)
    n = x.shape[0]
    steps = 0
    synchronize(x.device)
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen).to(x.device)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(logits(model, x[idx], ids[idx]), y[idx])
            if penalty is not None and lam != 0.0:
                loss = loss + lam * penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    synchronize(x.device)
    return time.perf_counter() - t0, steps


@torch.no_grad()
def accuracy(model: Net, task: Task, split: str) -> float:
    """Accuracy on ``task``'s ``split`` ("train", "val" or "test"); the model is left in train mode."""
    model.eval()
    pred = logits(model, task.x[split], task_ids(task, split)).argmax(1)
    model.train()
    return float((pred == task.y[split]).float().mean())


def measure_penalty_overhead(model: Net, mas, task: Task, cfg: Config, steps: int = 40) -> dict[str, float]:
    """Fastest seconds of one training step without and with the penalty, interleaved on one batch.

    Two penalty paths are timed: the differentiable ``mas.penalty()`` added to the loss
    (what the comparison trains with) and the fused ``mas.add_penalty_grad_()`` after
    ``backward``. The model's weights are restored afterwards.
    """
    device = torch.device(cfg.device)
    saved = snapshot(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)  # one fused update: faster on CPU too
    n = min(cfg.batch_size, task.x["train"].shape[0])
    x, y, ids = task.x["train"][:n], task.y["train"][:n], task_ids(task, "train")[:n]
    times: dict[str, list[float]] = {"plain": [], "autograd": [], "fused": []}
    model.train()
    for i in range(steps + 2):
        for kind in ("plain", "autograd", "fused"):
            synchronize(device)
            t0 = time.perf_counter()
            loss = F.cross_entropy(logits(model, x, ids), y)
            if kind == "autograd":
                loss = loss + mas.penalty()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if kind == "fused":
                mas.add_penalty_grad_()
            opt.step()
            synchronize(device)
            if i >= 2:  # warm-up
                times[kind].append(time.perf_counter() - t0)
    model.load_state_dict(saved)
    # the minimum over repeats: the least disturbed by other processes on a shared CPU
    fastest = {k: float(np.min(v)) for k, v in times.items()}
    out = {f"step_seconds_{k}": v for k, v in fastest.items()}
    out.update({f"step_seconds_{k}_median": float(np.median(v)) for k, v in times.items()})
    out["overhead_autograd"] = fastest["autograd"] / fastest["plain"] - 1.0
    out["overhead_fused"] = fastest["fused"] / fastest["plain"] - 1.0
    return out
