"""MAS in the Hugging Face ``Trainer``: a ``TrainerCallback`` (``docs/integrations.md``).

Needs ``transformers`` and ``accelerate`` (``pip install 'mas-local[hf]'``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from ..regularizer import MAS
from ._common import (
    LABEL_KEYS,
    ConsolidationData,
    FirstOutputCheck,
    PenaltyMeter,
    check_mas_spec,
    check_max_batches,
    check_same_model,
    make_mas,
    missing_framework,
    save_atomic,
    to_device,
)

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise missing_framework("mas_local.integrations.MASTrainerCallback", "transformers", "hf", exc) from exc

if not hasattr(TrainerCallback, "on_pre_optimizer_step"):  # pragma: no cover - old transformers
    raise ImportError(
        "MASTrainerCallback needs TrainerCallback.on_pre_optimizer_step, which this transformers lacks; "
        "upgrade it with: pip install -U 'mas-local[hf]'"
    )

STATE_FILE = "mas_state.pt"
WHO = "MASTrainerCallback"


class MASTrainerCallback(TrainerCallback):
    """Train with MAS in a ``transformers.Trainer``: penalty gradient, consolidation, logging, checkpoints.

    Args:
        mas: a :class:`mas_local.MAS` built on the model the Trainer trains (or on one of its submodules), or a
            dict of MAS settings (``{"lam": 100.0, "mode": "local"}``); with a dict the MAS is created on the
            Trainer's model when training first begins (:attr:`mas`), and reused by later ``train()`` calls.
        consolidate_on: what :meth:`MAS.consolidate` runs on when training ends: ``"train"`` (default: the
            Trainer's own training data loader, so each DDP rank uses its share), ``"eval"`` (its last evaluation
            loader), a DataLoader or any iterable of batches, a ``torch.utils.data.Dataset`` (batched here with
            ``batch_size`` and ``collate_fn``, each rank taking every world-size-th sample), or ``None`` (do not
            consolidate). Dict batches lose their ``drop_keys`` (labels) and are run as ``model(**batch)``, so an
            ``attention_mask`` in them decides which positions count (the MAS object's ``mask=``).
        drop_keys: keys removed from dict batches before consolidation (labels are never used by MAS).
        max_batches: consolidate on at most this many batches.
        clip_grad_norm: ``None`` (default): the Trainer clips the task gradient (``max_grad_norm``) and the
            penalty gradient is added after that, unclipped. A number: the callback clips the sum (task + penalty)
            to this norm itself, as Lightning does; set ``TrainingArguments(max_grad_norm=0)`` so that the
            gradient is clipped once.
        log_name: the key of the penalty in the Trainer's logs (mean over the optimizer steps since the last log).
        state_file: the MAS state's file name inside each checkpoint folder, and in ``output_dir`` after the
            consolidation.
        resume_from: the folder (or file) to load the MAS state from when training next starts (once); by default,
            when the Trainer resumes at step N, ``output_dir/checkpoint-N/<state_file>``.
        batch_size, collate_fn: how a ``Dataset`` given as ``consolidate_on`` is batched (default: the Trainer's
            ``per_device_eval_batch_size`` and ``transformers.default_data_collator``).

    The penalty gradient ``2λΩ(θ−θ*)`` is added in ``on_pre_optimizer_step``: once per optimizer step, after
    gradient accumulation (and after DDP's all-reduce), and after the Trainer's gradient clipping, which runs
    before that hook. So the logged ``grad_norm`` is the task gradient's. Under fp16 mixed precision the
    gradients are unscaled first if the Trainer has not done it.
    """

    def __init__(
        self,
        mas: MAS | Mapping[str, Any],
        consolidate_on: str | Iterable[Any] | Dataset | None = "train",
        *,
        drop_keys: Sequence[str] = LABEL_KEYS,
        max_batches: int | None = None,
        clip_grad_norm: float | None = None,
        log_name: str = "mas_penalty",
        state_file: str = STATE_FILE,
        resume_from: str | os.PathLike | None = None,
        batch_size: int | None = None,
        collate_fn: Any = None,
    ) -> None:
        check_mas_spec(mas, WHO)
        if isinstance(consolidate_on, str) and consolidate_on not in ("train", "eval"):
            raise ValueError(
                f"{WHO}: consolidate_on must be 'train', 'eval', None, a DataLoader/iterable of batches or a Dataset, "
                f"got {consolidate_on!r}"
            )
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"{WHO}: clip_grad_norm must be a positive number or None, got {clip_grad_norm!r}")
        check_max_batches(max_batches, WHO)
        self._spec = mas
        self.mas: MAS | None = mas if isinstance(mas, MAS) else None
        self.consolidate_on = consolidate_on
        self.drop_keys = tuple(drop_keys)
        self.max_batches = max_batches
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.log_name = log_name
        self.state_file = state_file
        self.resume_from = resume_from
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.meter = PenaltyMeter()
        self._output_check = FirstOutputCheck()
        self._stepped_at: int | None = None  # the global step whose penalty was added (one add per step)
        self._consolidated = False  # this train() consolidated already

    def _twice(self, what: str) -> None:
        warnings.warn(
            f"{WHO} is registered twice on this Trainer (e.g. callbacks=[cb] and then callback_handler.callbacks."
            f"insert(0, cb)); its second {what} is skipped, so the penalty is added once per step and the task is "
            "consolidated once. Register it once (docs/integrations.md, 'Logging')",
            UserWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------ set-up and resume
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
            raise ValueError(
                f"{WHO} works with single-device and DDP training; under DeepSpeed or FSDP the Trainer moves or "
                "shards the gradients it steps on, so a penalty added to .grad would be lost: add mas.penalty() to the "
                "loss in a Trainer subclass's compute_loss instead (docs/integrations.md)"
            )
        if self.clip_grad_norm is not None and args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                f"{WHO}(clip_grad_norm={self.clip_grad_norm}) clips task + penalty gradient itself; set "
                f"TrainingArguments(max_grad_norm=0) so that the gradient is clipped once (it is {args.max_grad_norm})"
            )
        if model is None:
            raise ValueError(f"{WHO}: the Trainer passed no model to on_train_begin")
        if self.mas is None:
            self.mas = make_mas(self._spec, model, WHO)
        else:
            check_same_model(self.mas.model, model, WHO)
        self.meter = PenaltyMeter()
        self._stepped_at, self._consolidated = None, False
        path = self._resume_path(args, state)
        if path is not None:
            self.load_state(path)
        self._output_check.drop()
        if self.consolidate_on is not None:
            self._output_check.arm(self.mas, WHO)

    def _resume_path(self, args, state) -> str | None:
        if self.resume_from is not None:  # used once: a later train() (the next task) must not load it again
            path, self.resume_from = os.fspath(self.resume_from), None
            return os.path.join(path, self.state_file) if os.path.isdir(path) else path
        if state.global_step <= 0:  # a fresh run: nothing to restore
            return None
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        path = os.path.join(folder, self.state_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{WHO}: the Trainer resumes at step {state.global_step} but {path!r} does not exist, so the MAS "
                "state (Ω, θ*) of that checkpoint is unknown; pass resume_from=<checkpoint folder> if the "
                "checkpoint is elsewhere"
            )
        return path

    def load_state(self, path: str | os.PathLike) -> None:
        """Load a MAS state saved by this callback (``torch.load(..., weights_only=True)``)."""
        if self.mas is None:
            raise RuntimeError(f"{WHO}: no MAS yet to load {os.fspath(path)!r} into; it is made when training begins")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.mas.load_state_dict(state)

    # ------------------------------------------------------------------ the penalty
    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model: nn.Module | None = None, **kwargs):
        if self.mas is None:  # on_train_begin did not run (a Trainer driven by hand)
            raise RuntimeError(f"{WHO}: on_pre_optimizer_step before on_train_begin")
        if self._stepped_at == state.global_step:  # the same callback object, called again for this step
            self._twice("penalty of a step")
            return
        self._stepped_at = state.global_step
        unscale_pending(optimizer)
        value = self.mas.add_penalty_grad_()
        if self.clip_grad_norm is not None:
            params = (model if model is not None else self.mas.model).parameters()
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.clip_grad_norm)
        self.meter.add(value)

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs):
        if logs is None or not ({"loss", "train_loss"} & logs.keys()):
            return
        mean = self.meter.pop_mean()
        if mean is None:
            return
        logs[self.log_name] = mean
        history = state.log_history
        if history and history[-1].get("step") == state.global_step and self.log_name not in history[-1]:
            history[-1][self.log_name] = mean  # Trainer.log recorded the entry just before calling on_log

    # ------------------------------------------------------------------ checkpoints
    def on_save(self, args, state, control, **kwargs):
        if self.mas is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            warnings.warn(
                f"{WHO}: no checkpoint folder {folder!r} to save the MAS state in (hyperparameter search runs save "
                "elsewhere); resuming from this checkpoint needs resume_from=",
                UserWarning,
                stacklevel=2,
            )
            return
        save_atomic(self.mas.state_dict(), os.path.join(folder, self.state_file))

    # ------------------------------------------------------------------ consolidation
    def on_train_end(self, args, state, control, train_dataloader=None, eval_dataloader=None, **kwargs):
        self._output_check.drop()
        if self.mas is None or self.consolidate_on is None:
            return
        if self._consolidated:
            self._twice("consolidation")
            return
        if self.consolidate_on == "train":
            data, move = train_dataloader, None  # prepared by accelerate: on the device, this rank's share
        elif self.consolidate_on == "eval":
            data, move = eval_dataloader, None
        elif is_dataset(self.consolidate_on):
            data, move = self._dataset_loader(args), args.device
        else:
            data, move = self.consolidate_on, args.device
        if data is None:
            raise ValueError(
                f"{WHO}: consolidate_on={self.consolidate_on!r} but the Trainer has no such data loader; pass the "
                "data to consolidate on (a DataLoader, a list of batches or a Dataset)"
            )
        batches = ConsolidationData(data, self.drop_keys, None if move is None else (lambda b: to_device(b, move)))
        self.mas.consolidate(batches, max_batches=self.max_batches)
        self._consolidated = True
        self.meter = PenaltyMeter()
        if args.should_save:
            os.makedirs(args.output_dir, exist_ok=True)
            save_atomic(self.mas.state_dict(), os.path.join(args.output_dir, self.state_file))

    def _dataset_loader(self, args) -> DataLoader:
        """This rank's share of a Dataset, batched: every world-size-th sample from the rank's index."""
        dataset = self.consolidate_on
        rank, world = max(args.process_index, 0), max(args.world_size, 1)
        if world > 1 and not isinstance(dataset, IterableDataset):
            dataset = Subset(dataset, range(rank, len(dataset), world))
        collate = self.collate_fn
        if collate is None:
            from transformers import default_data_collator

            collate = default_data_collator
        return DataLoader(dataset, batch_size=self.batch_size or args.per_device_eval_batch_size, collate_fn=collate)


def is_dataset(obj: Any) -> bool:
    """A dataset of samples (to be batched here) rather than an iterable of batches."""
    if isinstance(obj, (DataLoader, list, tuple)):
        return False
    return isinstance(obj, Dataset) or hasattr(obj, "column_names")  # torch datasets, Hugging Face `datasets`


def unscale_pending(optimizer: Any) -> None:
    """Unscale fp16 gradients (accelerate's GradScaler) if nothing has yet: the penalty is added in true units.

    The Trainer unscales when it clips; with ``max_grad_norm=0`` the gradients are still scaled when
    ``on_pre_optimizer_step`` runs. ``scaler.step`` then sees them unscaled and does not unscale again.
    """
    scaler = getattr(optimizer, "scaler", None)
    inner = getattr(optimizer, "optimizer", None)
    if scaler is None or inner is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    stage = getattr(scaler, "_per_optimizer_states", {}).get(id(inner), {}).get("stage", OptState.READY)
    if stage is OptState.READY:
        scaler.unscale_(inner)
