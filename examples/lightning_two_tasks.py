"""Two permuted-digits tasks in a row with Lightning, with and without MASLightningCallback.

An MLP learns scikit-learn's bundled handwritten digits (task 1), then the same digits with their pixels
permuted (task 2). The callback consolidates on the training DataLoader when task 1 ends (the (x, y) batches'
labels are ignored), adds the penalty gradient once per optimizer step in task 2 (after gradient accumulation,
before Lightning's gradient clipping), logs it as ``mas_penalty``, and keeps the MAS state in the checkpoints.

Run: python examples/lightning_two_tasks.py   (needs: pip install 'mas-local[lightning]' scikit-learn)
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mas_local as ml
from mas_local.integrations import MASLightningCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, index):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def tasks(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]
    out = []
    for t in range(2):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=g)
        out.append((TensorDataset(x[train][:, perm], y[train]), TensorDataset(x[test][:, perm], y[test])))
    return out


def accuracy(module: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (module(x).argmax(1) == y).float().mean().item()


def fit(module: pl.LightningModule, data: TensorDataset, callbacks, folder: str, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=5,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        default_root_dir=folder,  # checkpoints under folder/checkpoints/ carry the callback's MAS state
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=True))
    return trainer


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
    torch.manual_seed(0)
    (train1, test1), (train2, test2) = tasks()
    out = tempfile.mkdtemp(prefix="mas_lightning_")

    base = Classifier()
    callback = MASLightningCallback({"lam": 1.0, "progress": False})  # MAS(base, lam=1.0), created by fit
    fit(base, train1, [callback], f"{out}/task1")
    mas = callback.mas
    print(f"after task 1: task-1 accuracy {accuracy(base, test1):.3f}; MAS holds {mas.num_tasks} task(s)")

    for name in ("fine-tune", "MAS"):
        module = copy.deepcopy(base)
        callbacks = []
        if name == "MAS":
            mas_2 = ml.MAS(module, lam=mas.lam, progress=False)
            mas_2.load_state_dict(mas.state_dict())
            callbacks = [MASLightningCallback(mas_2, consolidate_on=None, prog_bar=True)]
        trainer = fit(module, train2, callbacks, f"{out}/{name}", accumulate_grad_batches=2, gradient_clip_val=5.0)
        penalty = trainer.callback_metrics.get("mas_penalty")
        print(
            f"{name:>9}: task-1 accuracy {accuracy(module, test1):.3f}, task-2 accuracy {accuracy(module, test2):.3f}"
            + ("" if penalty is None else f", last mas_penalty {float(penalty):.4f}")
        )
    # Resuming: pl.Trainer(...).fit(module, loader, ckpt_path=...) restores the callback's MAS state (Ω, θ*)
    # from the checkpoint before the first step.


if __name__ == "__main__":
    main()
