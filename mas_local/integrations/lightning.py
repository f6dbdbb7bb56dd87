"""MAS in the Lightning ``Trainer``: a ``Callback`` (``docs/integrations.md``).

Needs ``lightning`` (``pip install 'mas-local[lightning]'``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..regularizer import MAS
from ._common import (
    LABEL_KEYS,
    ConsolidationData,
    FirstOutputCheck,
    check_mas_spec,
    check_max_batches,
    check_same_model,
    missing_framework,
)

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise missing_framework("mas_local.integrations.MASLightningCallback", "lightning", "lightning", exc) from exc

WHO = "MASLightningCallback"


class MASLightningCallback(pl.Callback):
    """Train with MAS in a Lightning ``Trainer``: penalty gradient, consolidation, logging, checkpoints.

    Args:
        mas: a :class:`mas_local.MAS` built on the ``LightningModule`` or on one of its submodules (say
            ``MAS(lit.net)``), or a dict of MAS settings (``{"lam": 100.0, "mode": "local"}``); with a dict the MAS
            is created on the ``LightningModule`` itself at the first ``fit`` (:attr:`mas`) and reused by later ones.
        consolidate_on: what :meth:`MAS.consolidate` runs on when training ends (``on_train_end``): ``"train"``
            (default: the Trainer's training DataLoader, with its distributed sampler under DDP, so each rank uses its
            share), ``"val"`` (the validation DataLoader), a DataLoader or any iterable of batches, or ``None`` (do
            not consolidate). Batches are moved to the device as the Trainer moves training batches; dict batches
            lose their ``drop_keys``; a ``(x, y)`` tuple is run as ``model(x)``.
        drop_keys: keys removed from dict batches before consolidation (labels are never used by MAS).
        max_batches: consolidate on at most this many batches.
        log_name: the name the penalty is logged under (``pl_module.log``, every optimizer step).
        prog_bar: also show the penalty in the progress bar.

    The penalty gradient ``2λΩ(θ−θ*)`` is added in ``on_before_optimizer_step``: once per optimizer step, after
    gradient accumulation (and DDP's all-reduce, and AMP's unscaling), and before Lightning clips the gradient
    (``gradient_clip_val``), so the clipped gradient is task + penalty. The MAS state (Ω, θ*, task count) is
    this callback's ``state_dict``, so Lightning checkpoints carry it and ``fit(ckpt_path=...)`` restores it.
    """

    def __init__(
        self,
        mas: MAS | Mapping[str, Any],
        consolidate_on: str | Iterable[Any] | None = "train",
        *,
        drop_keys: Sequence[str] = LABEL_KEYS,
        max_batches: int | None = None,
        log_name: str = "mas_penalty",
        prog_bar: bool = False,
    ) -> None:
        check_mas_spec(mas, WHO)
        if isinstance(consolidate_on, str) and consolidate_on not in ("train", "val"):
            raise ValueError(
                f"{WHO}: consolidate_on must be 'train', 'val', None or a DataLoader/iterable of batches, "
                f"got {consolidate_on!r}"
            )
        check_max_batches(max_batches, WHO)
        self._spec = mas
        self.mas: MAS | None = mas if isinstance(mas, MAS) else None
        self._pending: dict[str, Any] | None = None  # a state loaded before the MAS exists
        self.consolidate_on = consolidate_on
        self.drop_keys = tuple(drop_keys)
        self.max_batches = max_batches
        self.log_name = log_name
        self.prog_bar = prog_bar
        # a task trained but not yet consolidated: checkpoints written during training say so, and a fit resumed
        # from one whose training had ended (Lightning then skips on_train_start/end) consolidates at on_fit_end
        self._task_open = False
        self._ended_this_fit = False
        self._output_check = FirstOutputCheck()

    # ------------------------------------------------------------------ set-up
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.mas is None:
            self.mas = MAS(pl_module, **dict(self._spec))
        else:
            check_same_model(self.mas.model, pl_module, WHO)
        if self._pending is not None:
            self.mas.load_state_dict(self._pending)
            self._pending = None
        self._ended_this_fit = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _refuse_sharding(trainer)
        self._state_to_devices()
        self._task_open = True
        self._output_check.drop()
        if self.consolidate_on is not None and self.mas is not None:
            self._output_check.arm(self.mas, WHO)

    def _state_to_devices(self) -> None:
        mas = self.mas
        if mas is not None and any(  # restored or consolidated before the model moved to its device
            mas.importance[n].device != p.device for n, p in mas.params.items() if n in mas.importance
        ):
            mas.load_state_dict(mas.state_dict())  # loads Ω and θ* onto each parameter's device

    # ------------------------------------------------------------------ the penalty
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.mas is None:
            raise RuntimeError(f"{WHO}: on_before_optimizer_step before setup(stage='fit')")
        if len(trainer.optimizers) > 1:
            raise ValueError(
                f"{WHO} supports one optimizer (it adds the penalty gradient of every regularised parameter before "
                f"each step); this Trainer has {len(trainer.optimizers)}: call mas.add_penalty_grad_() yourself"
            )
        value = self.mas.add_penalty_grad_()
        pl_module.log(self.log_name, value, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=1)

    # ------------------------------------------------------------------ consolidation
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._output_check.drop()
        self._ended_this_fit = True
        self._consolidate(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._task_open and not self._ended_this_fit:
            # resumed from a checkpoint written after the task's training but before its consolidation: the
            # loop was done, so Lightning ran neither on_train_start nor on_train_end
            self._state_to_devices()
            self._consolidate(trainer)

    def _consolidate(self, trainer: pl.Trainer) -> None:
        if self.mas is None or self.consolidate_on is None:
            self._task_open = False
            return
        if self.consolidate_on == "train":
            data = trainer.train_dataloader
        elif self.consolidate_on == "val":
            data = trainer.val_dataloaders
        else:
            data = self.consolidate_on
        if data is None:
            raise ValueError(
                f"{WHO}: consolidate_on={self.consolidate_on!r} but the Trainer has no such DataLoader; pass the data "
                "to consolidate on (a DataLoader or a list of batches)"
            )
        if isinstance(data, (Mapping, list, tuple)) and isinstance(self.consolidate_on, str):
            raise ValueError(
                f"{WHO}: the Trainer has several {self.consolidate_on} DataLoaders ({type(data).__name__}); pass the "
                "one to consolidate on as consolidate_on="
            )
        batches = ConsolidationData(data, self.drop_keys, lambda b: trainer.strategy.batch_to_device(b))
        self.mas.consolidate(batches, max_batches=self.max_batches)
        self._task_open = False

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"mas": MAS.state_dict(), "task_open": bool}``: Ω, θ* and the task count (tensors and numbers only),
        and whether a task was being trained and is not consolidated yet."""
        if self.mas is not None:
            return {"mas": self.mas.state_dict(), "task_open": self._task_open}
        return {} if self._pending is None else {"mas": self._pending, "task_open": self._task_open}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the MAS state of a checkpoint (checked against the model: names, shapes, finite values)."""
        if "mas" not in state_dict:
            return  # saved before any MAS existed
        self._task_open = bool(state_dict.get("task_open", False))
        if self.mas is None:
            self._pending = state_dict["mas"]
        else:
            self.mas.load_state_dict(state_dict["mas"])


def _refuse_sharding(trainer: pl.Trainer) -> None:
    """FSDP and DeepSpeed re-create or shard the parameters MAS holds: the penalty would not reach them."""
    name = type(trainer.strategy).__name__
    if any(key in name for key in ("FSDP", "DeepSpeed", "ModelParallel")):
        raise ValueError(
            f"{WHO} works with single-device and DDP strategies, not {name}: the parameters it trains are not the "
            "ones MAS holds; add mas.penalty() to the loss in training_step instead (docs/integrations.md)"
        )
