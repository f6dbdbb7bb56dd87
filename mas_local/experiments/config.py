"""The comparison's settings: the method names, the defaults, and one validation of them all."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .data import BENCHMARKS, SPLIT_MAX_TASKS
from .models import MODELS, TRAINING_DEFAULTS

METHODS = ("finetune", "joint", "global-sample", "global-batch", "local-hebbian", "local-sample")
MAS_METHODS = {  # method -> (mode, estimator) of mas_local.MAS
    "global-sample": ("global", "sample"),
    "global-batch": ("global", "batch"),
    "local-hebbian": ("local", "hebbian"),
    "local-sample": ("local", "sample"),
}
DEFAULT_LAM_GRID = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)


@dataclass
class Config:
    """One comparison run; the fields are the command's options (``--lam-grid`` is ``lam_grid``)."""

    seeds: int = 3
    tasks: int = 5
    epochs: int | None = None  # None: the model's default (models.TRAINING_DEFAULTS)
    model: str = "mlp"
    benchmark: str = "permuted"
    lam_grid: tuple[float, ...] = DEFAULT_LAM_GRID
    methods: tuple[str, ...] = METHODS
    out: str = "runs/compare"
    device: str = "cpu"
    batch_size: int | None = None  # None: the model's default (models.TRAINING_DEFAULTS)
    lr: float | None = None  # None: the model's default (models.TRAINING_DEFAULTS)
    importance_batch_size: int = 128
    threads: int = 1
    quiet: bool = False
    plots: bool = True

    def uses_mas(self) -> bool:
        return any(m in MAS_METHODS for m in self.methods)

    def validate(self) -> None:
        """Fill in the model's default epochs and lr where unset; raise ``ValueError`` for any bad setting."""
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
        epochs, lr, batch_size = TRAINING_DEFAULTS[self.model]
        self.epochs = epochs if self.epochs is None else self.epochs
        self.lr = lr if self.lr is None else self.lr
        self.batch_size = batch_size if self.batch_size is None else self.batch_size
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
                hint = " (λ is a value, not an exponent: write 10^-1 as 1e-1)" if lam < 0 else ""
                raise ValueError(f"--lam-grid values must be finite and >= 0, got {lam:g}{hint}")
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
