"""What the framework callbacks share: consolidation batches, the penalty meter, the extras' import errors.

Nothing here imports a training framework (``docs/integrations.md``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed.groups import unwrap
from ..regularizer import MAS

#: keys a dict batch carries for the loss; MAS never uses labels, so they are dropped before ``model(**batch)``
LABEL_KEYS: tuple[str, ...] = ("labels", "label", "label_ids")


def missing_framework(what: str, package: str, extra: str, exc: ImportError) -> ImportError:
    """The error a callback raises when its framework is not installed: names the package and the extra."""
    return ImportError(
        f"{what} needs the {package!r} package, which could not be imported ({exc}); "
        f"install it with: pip install 'mas-local[{extra}]'"
    )


def strip_keys(batch: Any, keys: Sequence[str]) -> Any:
    """``batch`` without ``keys`` in its dict part (a dict, or a tuple/list whose first element is a dict)."""
    if not keys:
        return batch
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in keys}
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Mapping):
        first = strip_keys(batch[0], keys)
        return [first, *batch[1:]] if isinstance(batch, list) else (first, *batch[1:])
    return batch


def to_device(batch: Any, device: torch.device | str | None) -> Any:
    """Tensors of a (nested) batch moved to ``device``; other leaves as they are."""
    if device is None:
        return batch
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class ConsolidationData:
    """The batches :meth:`MAS.consolidate` sees: label keys dropped from dict batches, then ``move(batch)``.

    Keeps the length of ``data`` when it has one (the progress bar shows it).
    """

    def __init__(
        self, data: Iterable[Any], drop_keys: Sequence[str] = LABEL_KEYS, move: Callable[[Any], Any] | None = None
    ) -> None:
        if isinstance(data, (Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
            raise TypeError(
                f"the consolidation data must be an iterable of batches (a DataLoader, a list of batches), got "
                f"{type(data).__name__}"
            )
        self.data = data
        self.drop_keys = tuple(drop_keys)
        self.move = move

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            batch = strip_keys(batch, self.drop_keys)
            yield batch if self.move is None else self.move(batch)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError when data has no length, as for any iterable


class PenaltyMeter:
    """The penalty values of the optimizer steps since the last log, kept on device (no sync per step)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.count = 0

    def add(self, value: Tensor) -> None:
        value = value.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def pop_mean(self) -> float | None:
        """Mean since the last call (``None`` if no step ran), then reset."""
        if self.count == 0 or self.total is None:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = None, 0
        return mean


def make_mas(spec: Any, model: nn.Module, who: str) -> MAS:
    """The MAS a callback uses: ``spec`` itself, or ``MAS(model, **spec)`` when ``spec`` is a dict of settings."""
    if isinstance(spec, MAS):
        check_same_model(spec.model, model, who)
        return spec
    return MAS(model, **dict(spec))


def check_max_batches(max_batches: Any, who: str) -> None:
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"{who}: max_batches must be a positive int or None, got {max_batches!r}")


def check_mas_spec(spec: Any, who: str) -> None:
    """A callback takes a MAS object or a dict of its settings; anything else is refused now."""
    if not isinstance(spec, (MAS, Mapping)):
        raise TypeError(
            f"{who} takes a mas_local.MAS or a dict of MAS settings (lam, mode, ...), got {type(spec).__name__}"
        )
    if isinstance(spec, Mapping) and "model" in spec:
        raise TypeError(f"{who}: the MAS settings must not hold 'model'; the callback uses the model being trained")


def inside(module: nn.Module, root: nn.Module) -> bool:
    """``module`` is ``root`` or one of its submodules (wrappers looked through)."""
    module, root = unwrap(module), unwrap(root)
    return module is root or any(m is module for m in root.modules())


def check_same_model(mas_model: nn.Module, model: nn.Module | None, who: str) -> None:
    """Refuse a MAS built on a model that is neither the trained one nor one of its submodules."""
    if model is None or inside(mas_model, model):
        return
    raise ValueError(
        f"{who}: the MAS object regularises a {type(unwrap(mas_model)).__name__} that is not part of the "
        f"{type(unwrap(model)).__name__} being trained (another model object); create MAS on the model you train "
        "or one of its submodules, or pass MAS settings (a dict) so the callback creates it on that model"
    )


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename: a crash never leaves half a file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def check_first_output(mas: MAS, who: str) -> Any:
    """Read the model's output on the first training forward as consolidation will (``output_fn``), so that a
    model whose output it cannot read (a plain dict, a custom output class) fails at the first step instead of
    after the whole task has trained. Returns the hook's handle (it removes itself after one forward), or
    ``None`` with a custom ``forward_fn`` (consolidation then reads what that returns, not the model's output)."""
    if mas.config.forward_fn is not None:
        return None
    from ..importance.batches import default_output_fn

    read = mas.config.output_fn or default_output_fn
    handle = None

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        handle.remove()
        try:
            measured = read(output)
        except Exception as e:
            raise ValueError(
                f"{who}: the task's consolidation will read the model's output with "
                f"{'output_fn' if mas.config.output_fn else 'the default output_fn'}, and it cannot read this "
                f"model's ({type(output).__name__}): {e}. Pass MAS(..., output_fn=...) returning the tensor to "
                "measure (checked on the first training step, before any optimizer step)"
            ) from e
        if not isinstance(measured, Tensor):
            raise ValueError(
                f"{who}: output_fn returned {type(measured).__name__} on the model's output, not a Tensor; "
                "consolidation needs the tensor to measure"
            )

    handle = mas.model.register_forward_hook(hook)
    return handle


class FirstOutputCheck:
    """A callback's :func:`check_first_output` hook: at most one armed at a time."""

    def __init__(self) -> None:
        self._handle: Any = None

    def arm(self, mas: MAS, who: str) -> None:
        self.drop()
        self._handle = check_first_output(mas, who)

    def drop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
