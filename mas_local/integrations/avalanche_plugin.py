"""MAS in Avalanche: a ``SupervisedPlugin`` for its strategies (``docs/integrations.md``, "Avalanche").

Needs ``avalanche-lib`` (``pip install 'mas-local[avalanche]'``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..importance.batches import default_output_fn
from ..regularizer import MAS
from ._common import (
    ConsolidationData,
    FirstOutputCheck,
    check_max_batches,
    check_same_model,
    missing_framework,
    to_device,
)

try:
    from avalanche.core import SupervisedPlugin
    from avalanche.models.dynamic_modules import MultiTaskModule
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise missing_framework("mas_local.integrations.MASAvalanchePlugin", "avalanche-lib", "avalanche", exc) from exc

WHO = "MASAvalanchePlugin"
# the keyword settings MAS takes (everything but the model): checked when the plugin is created
_MAS_SETTINGS = tuple(inspect.signature(MAS.__init__).parameters)[2:]


def _is_multi_task(model: nn.Module) -> bool:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return isinstance(model, MultiTaskModule)


def avalanche_forward_fn(model: nn.Module, batch: Any) -> Any:
    """Run ``model`` on an Avalanche mini-batch ``[x, y, task_labels]`` as Avalanche's strategies do: a
    ``MultiTaskModule`` gets ``model(x, task_labels)``, any other model ``model(x)``. The labels are never used."""
    if isinstance(batch, Tensor):
        return model(batch)
    if not isinstance(batch, (tuple, list)) or not batch:
        raise TypeError(
            f"{WHO}: an Avalanche mini-batch is a list [x, y, task_labels], got {type(batch).__name__}; pass "
            "forward_fn=... to run the model on your batches"
        )
    if _is_multi_task(model):
        if len(batch) < 3:
            raise ValueError(
                f"{WHO}: {type(model).__name__} is a MultiTaskModule, which needs task labels, but the batch has "
                f"{len(batch)} elements, not [x, y, task_labels]; use a dataset with task labels or pass forward_fn=..."
            )
        return model(batch[0], batch[-1])
    return model(batch[0])


class AvalancheOutputScale:
    """``output_fn`` of :meth:`MASAvalanchePlugin.like_mas_plugin`: the output ``[B, d1, …, dk]`` divided by
    ``sqrt(d2·…·dk)``, so that ``‖f(x_k)‖²`` becomes the mean Avalanche's ``MASPlugin`` takes
    (``norm(out, dim=1).pow(2).mean()`` averages over d2…dk too; ``docs/math.md``). A 2-D output is unchanged."""

    def __init__(self, output_fn: Any = None) -> None:
        self.output_fn = output_fn

    def __call__(self, output: Any) -> Tensor:
        y = (self.output_fn or default_output_fn)(output)
        rest = math.prod(y.shape[2:])
        return y if rest == 1 else y * (1.0 / math.sqrt(rest))


class MASAvalanchePlugin(SupervisedPlugin):
    """Train with MAS in an Avalanche strategy (``Naive``, or any ``SupervisedTemplate``).

    Args:
        mas: a :class:`mas_local.MAS` built on the strategy's model (or one of its submodules), a dict of MAS
            settings, or ``None``; the MAS is then created as ``MAS(strategy.model, **settings)`` when training
            first starts (:attr:`mas`) and reused for every later experience.
        eval_mode: run the consolidation pass in ``eval()`` (mas-local's default; ``False`` is Avalanche's
            ``MASPlugin``, whose pass runs in train mode: Dropout draws and BatchNorm uses batch statistics and
            updates its running ones).
        batch_size: the consolidation's batch size (default: the strategy's ``train_mb_size``, as ``MASPlugin``).
        max_batches: consolidate on at most this many batches.
        **settings: MAS settings (``lam``, ``mode``, ``estimator``, ``accumulate``, ``alpha``, ``output_fn``,
            ``forward_fn``, ``mask``, ``backend``, ``micro_batch``, …) when ``mas`` is not given.

    The penalty ``λ Σ Ω (θ − θ*)²`` is added to ``strategy.loss`` in ``before_backward`` (the differentiable
    form, as ``MASPlugin`` does; ``docs/integrations.md`` says why). After each training experience, in
    ``after_training_exp``, the MAS consolidates on that experience's dataset (Ω of the experience, θ*
    snapshot), read in order by a ``DataLoader`` as ``MASPlugin`` reads it. A ``MultiTaskModule`` runs as
    ``model(x, task_labels)`` (:func:`avalanche_forward_fn`, the default ``forward_fn``). The MAS state travels
    with the plugin in Avalanche's checkpoints (``save_checkpoint`` / ``maybe_load_checkpoint``); it is also
    :meth:`state_dict` / :meth:`load_state_dict`, plain tensors for ``torch.load(..., weights_only=True)``.
    """

    def __init__(
        self,
        mas: MAS | Mapping[str, Any] | None = None,
        *,
        eval_mode: bool = True,
        batch_size: int | None = None,
        max_batches: int | None = None,
        **settings: Any,
    ) -> None:
        super().__init__()
        if mas is not None and not isinstance(mas, (MAS, Mapping)):
            raise TypeError(
                f"{WHO} takes a mas_local.MAS, a dict of MAS settings or MAS settings as keywords, "
                f"got {type(mas).__name__}"
            )
        if isinstance(mas, MAS) and settings:
            raise TypeError(
                f"{WHO}: MAS settings ({sorted(settings)}) cannot be given with a MAS object; set them on it"
            )
        spec = dict(settings) if not isinstance(mas, Mapping) else {**mas, **settings}
        unknown = sorted(set(spec) - set(_MAS_SETTINGS))
        if unknown:
            raise TypeError(f"{WHO}: unknown MAS settings {unknown}; MAS takes {list(_MAS_SETTINGS)}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"{WHO}: batch_size must be a positive int or None, got {batch_size!r}")
        check_max_batches(max_batches, WHO)
        # the values too (mode, estimator, lam, ...): a bad one fails here, not when training starts; the
        # activation names modules of the real model, so it is checked against that one
        MAS(nn.Linear(1, 1), **{k: v for k, v in spec.items() if k != "activation"})
        spec.setdefault("forward_fn", avalanche_forward_fn)
        self._spec = spec
        self.mas: MAS | None = mas if isinstance(mas, MAS) else None
        self.eval_mode = bool(eval_mode)
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.last_penalty: float | None = None  # the penalty of the last training iteration
        self._pending: dict[str, Any] | None = None  # a state loaded before the MAS exists
        self._fresh_new_params = False  # like_mas_plugin: a parameter new since the last consolidation starts at Ω_new
        self._added: set[str] = set()
        self._output_check = FirstOutputCheck()

    @classmethod
    def like_mas_plugin(cls, lambda_reg: float = 1.0, alpha: float = 0.5, **settings: Any) -> MASAvalanchePlugin:
        """The plugin set to compute what Avalanche's ``MASPlugin(lambda_reg, alpha)`` computes.

        Global ``batch`` importance in train mode on the experience's data in batches of ``train_mb_size``, the
        output's squared norm averaged over its dimensions after the first (:class:`AvalancheOutputScale`), Ω
        blended as ``α Ω_old + (1 − α) Ω_new`` from the second experience on (a parameter new since the last
        consolidation starts at ``Ω_new``), and the penalty ``λ Σ Ω (θ − θ*)²`` in the loss from the second
        experience on. ``settings`` (say ``backend``) are passed to MAS; an ``output_fn`` is applied before the
        scaling. Where the two still differ is in ``docs/integrations.md``, "Avalanche".
        """
        output_fn = AvalancheOutputScale(settings.pop("output_fn", None))
        spec = {"mode": "global", "estimator": "batch", "accumulate": "ema", **settings}
        plugin = cls(lam=lambda_reg, alpha=alpha, output_fn=output_fn, eval_mode=False, **spec)
        plugin._fresh_new_params = True
        return plugin

    # ------------------------------------------------------------------ set-up
    def before_training(self, strategy: Any, **kwargs: Any) -> None:
        self._attach(strategy.model)

    def _attach(self, model: nn.Module) -> MAS:
        if self.mas is None:
            self.mas = MAS(model, **self._spec)
        else:
            check_same_model(self.mas.model, model, WHO)
        if self.mas.config.forward_fn is None and _is_multi_task(self.mas.model):
            raise ValueError(
                f"{WHO}: the MAS object has no forward_fn, so its consolidation would call the MultiTaskModule "
                f"{type(self.mas.model).__name__} without task labels; create it with "
                "MAS(..., forward_fn=mas_local.integrations.avalanche_plugin.avalanche_forward_fn) or pass MAS "
                "settings to the plugin"
            )
        if self._pending is not None:
            self.mas.load_state_dict(self._pending)
            self._pending = None
        return self.mas

    def before_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        mas = self._attach(strategy.model)  # the model after Avalanche's adaptation (new heads, grown layers)
        changes = mas.param_changes()
        if any(changes.values()):
            self._follow(mas, changes)
        if any(  # restored or consolidated before the model moved to its device
            mas.importance[n].device != p.device for n, p in mas.params.items() if n in mas.importance
        ):
            mas.load_state_dict(mas.state_dict())
        self._output_check.arm(mas, WHO)

    def _follow(self, mas: MAS, changes: dict[str, list[str]]) -> None:
        """Regularise the adapted model's parameters, as MASPlugin does: a new parameter (a new head of a
        ``MultiHeadClassifier``) has Ω = 0 until the next consolidation; a grown one (an ``IncrementalClassifier``'s
        output layer) keeps its Ω and θ* on its old units and has Ω = 0 on the new ones."""
        current = dict(mas.model.named_parameters())
        grown = {}
        for name in changes["replaced"]:
            old, new = mas.params[name], current[name]
            if old.shape == new.shape or name not in mas.importance:
                continue
            if old.dim() != new.dim() or any(o > n for o, n in zip(old.shape, new.shape)):
                raise ValueError(
                    f"{WHO}: {name!r} changed shape from {tuple(old.shape)} to {tuple(new.shape)} since the last "
                    "experience; Ω and θ* can follow a parameter that grows (new units get Ω = 0), not one that "
                    "shrinks or changes rank. Keep the parameter's shape, or create a new plugin"
                )
            grown[name] = (mas.importance[name], mas.anchors[name])
        mas.refresh_params()
        for name, (omega, anchor) in grown.items():
            kept = tuple(slice(0, s) for s in omega.shape)
            mas.importance[name][kept] = omega
            mas.anchors[name][kept] = anchor
        self._added |= set(changes["added"])

    # ------------------------------------------------------------------ the penalty
    def before_backward(self, strategy: Any, **kwargs: Any) -> None:
        if self.mas is None or self.mas.num_tasks == 0:
            return  # nothing consolidated yet: no penalty, as MASPlugin on the first experience
        penalty = self.mas.penalty()
        self.last_penalty = float(penalty.detach())
        strategy.loss = strategy.loss + penalty

    # ------------------------------------------------------------------ consolidation
    def after_training_exp(self, strategy: Any, **kwargs: Any) -> None:
        self._output_check.drop()
        mas = self._attach(strategy.model)
        experience = getattr(strategy, "experience", None)
        dataset = getattr(experience, "dataset", None)
        if dataset is None:
            raise ValueError(f"{WHO}: the strategy has no current experience dataset to consolidate on")
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size or strategy.train_mb_size,
            shuffle=False,
            collate_fn=getattr(dataset, "collate_fn", None),
        )
        device = strategy.device
        batches = ConsolidationData(loader, drop_keys=(), move=lambda b: to_device(b, device))
        if self._fresh_new_params and mas.num_tasks > 0:
            # MASPlugin starts a parameter it has no Ω for at Ω_new; an entry of Ω = 0 would blend it to (1−α)Ω_new
            mas.importance = {k: v for k, v in mas.importance.items() if k not in self._added}
        mas.consolidate(batches, eval_mode=self.eval_mode, max_batches=self.max_batches)
        self._added.clear()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``{"mas": MAS.state_dict()}`` (tensors and numbers; ``{}`` before the MAS exists)."""
        if self.mas is not None:
            return {"mas": self.mas.state_dict()}
        return {} if self._pending is None else {"mas": self._pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` (checked against the model: names, shapes, finite values)."""
        if "mas" not in state:
            return
        if self.mas is None:
            self._pending = dict(state["mas"])
        else:
            self.mas.load_state_dict(state["mas"])

    def __getstate__(self) -> dict[str, Any]:
        # Avalanche's save_checkpoint pickles the strategy with its plugins: the MAS goes with the model it
        # regularises (the same objects in the same pickle); the armed output check, a hook handle, does not
        state = dict(self.__dict__)
        state["_output_check"] = FirstOutputCheck()
        return state
