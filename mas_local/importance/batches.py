"""Batches as users pass them: how to run the model on one, how many samples it holds, sanity checks."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ImportanceError
from .leaves import tensor_leaves


def default_output_fn(output: Any) -> Tensor:
    """The tensor MAS measures: the output itself, its ``.logits``, or the first element of a tuple."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise ImportanceError(f"cannot find the output tensor in a {type(output).__name__}; pass output_fn=... to pick it")


def call_model(model: nn.Module, batch: Any, forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> Any:
    """Run the model on one batch (``docs/math.md``, "Batches").

    ``forward_fn(model, batch)`` when given; otherwise a Tensor is ``model(x)``, a dict is
    ``model(**batch)``, and a tuple/list is its first element as one of those (labels ignored).
    """
    if forward_fn is not None:
        return forward_fn(model, batch)
    inputs = model_inputs(batch)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, Tensor):
        return model(inputs)
    raise ImportanceError(
        "a batch must be a Tensor, a Mapping (dict, BatchEncoding), or a tuple/list whose first element is one "
        f"of those, got {type(inputs).__name__}; pass forward_fn=lambda model, batch: ... for other layouts"
    )


def model_inputs(batch: Any) -> Any:
    """The part of a batch the model sees (the rest of a tuple, e.g. labels, is ignored).

    Any ``Mapping`` (a dict, a tokenizer's ``BatchEncoding``, a ``UserDict``) is a dict batch.
    """
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ImportanceError("a batch is an empty tuple/list")
        return batch[0]
    return batch


def plain(obj: Any) -> Any:
    """``obj`` with every ``Mapping`` that pytree does not know (``BatchEncoding``, ``UserDict``) as a dict,
    so that its tensors are leaves like a dict's."""
    if isinstance(obj, Mapping) and type(obj) is not dict:
        return {k: plain(v) for k, v in obj.items()}
    if type(obj) in (tuple, list):
        return type(obj)(plain(v) for v in obj)
    if type(obj) is dict:
        return {k: plain(v) for k, v in obj.items()}
    return obj


def batch_tensors(batch: Any) -> list[Tensor]:
    """Every tensor of a batch (in any nesting of tuples, lists and mappings)."""
    return tensor_leaves(plain(batch))


def batch_size(batch: Any) -> int:
    """Number of samples: the leading dimension of the first tensor the model sees."""
    leaves = batch_tensors(model_inputs(batch))
    if not leaves or leaves[0].dim() == 0:
        raise ImportanceError("a batch must hold a tensor with a leading batch dimension")
    return int(leaves[0].shape[0])


def position_mask(mask: str | Callable[[Any], Tensor] | None, batch: Any, n: int) -> Tensor | None:
    """The positions that count, as bool ``[n, T]`` (``docs/math.md``, "Masks"), or ``None`` for all.

    A key name is looked up in dict batches (a missing ``"attention_mask"``, the default, means
    no mask; any other missing key is an error); a callable gets the batch.
    """
    if mask is None:
        return None
    if isinstance(mask, str):
        inputs = model_inputs(batch)
        value = inputs.get(mask) if isinstance(inputs, Mapping) else None
        if value is None:
            if mask == "attention_mask":
                return None
            raise ImportanceError(f"mask={mask!r}: the batch has no such key (keys: {_keys(inputs)})")
        source = f"batch[{mask!r}]"
    else:
        value = mask(batch)
        source = "mask(batch)"
    if not isinstance(value, Tensor) or value.dim() != 2 or value.shape[0] != n:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ImportanceError(f"{source} must be a [batch={n}, positions] tensor, got {shape}")
    if value.dtype != torch.bool:
        if value.is_floating_point() or not ((value == 0) | (value == 1)).all():
            raise ImportanceError(f"{source} must be boolean or 0/1 integers (1 = a real position)")
        value = value.bool()
    return value


def _keys(inputs: Any) -> list:
    return sorted(inputs) if isinstance(inputs, Mapping) else []


def sequence_length(batch: Any, mask: Tensor | None) -> int | None:
    """Positions per sample (T): the mask's second dimension, else that of the first input tensor."""
    if mask is not None:
        return int(mask.shape[1])
    for t in batch_tensors(model_inputs(batch)):
        if t.dim() >= 2:
            return int(t.shape[1])
    return None


def check_batch(batch: Any, index: int, devices: set, float_dtypes: set) -> None:
    """Clear errors for inputs on the wrong device or in the wrong floating dtype (``devices`` and
    ``float_dtypes`` are the model parameters')."""
    if not devices:
        return
    for t in batch_tensors(model_inputs(batch)):
        if len(devices) == 1 and t.device not in devices:
            raise ImportanceError(
                f"batch {index}: input tensor is on {t.device} but the model is on {next(iter(devices))}"
            )
        if (
            t.is_floating_point()
            and len(float_dtypes) == 1
            and t.dtype not in float_dtypes
            and not torch.is_autocast_enabled(t.device.type)
        ):
            raise ImportanceError(
                f"batch {index}: input tensor has dtype {t.dtype} but the model's parameters are "
                f"{next(iter(float_dtypes))}; convert the data (or run under torch.autocast)"
            )


def _rebuilt(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` with ``fn`` applied to each tensor, containers rebuilt as their own types where possible."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        items = {k: _rebuilt(v, fn) for k, v in obj.items()}
        if type(obj) is dict:
            return items
        try:  # BatchEncoding(dict), UserDict(dict), OrderedDict(dict)
            return type(obj)(items)
        except Exception:
            return items
    if type(obj) in (tuple, list):
        return type(obj)(_rebuilt(v, fn) for v in obj)
    leaves, spec = tree_flatten(obj)
    if len(leaves) == 1 and leaves[0] is obj:
        return obj
    return tree_unflatten([_rebuilt(v, fn) for v in leaves], spec)


def slice_batch(batch: Any, start: int, stop: int, n: int) -> Any:
    """Samples ``start:stop`` of a batch: every tensor whose leading dimension is the batch size is cut."""
    return _rebuilt(batch, lambda t: t[start:stop] if t.dim() > 0 and t.shape[0] == n else t)


def select_samples(batch: Any, index: Tensor, n: int) -> Any:
    """The samples ``index`` (a 1-D long tensor) of a batch: every tensor whose leading dimension is n is indexed."""
    return _rebuilt(batch, lambda t: t.index_select(0, index.to(t.device)) if t.dim() > 0 and t.shape[0] == n else t)


def unpadded(batch: Any, real: Tensor) -> Any:
    """A one-sample batch cut to its real positions: every tensor laid out ``[1, T, ...]`` with T the mask's length
    keeps the positions where ``real`` (bool ``[T]``) is true."""
    positions = real.shape[0]
    keep = real.nonzero().squeeze(1)
    if keep.numel() == positions:
        return batch

    def cut(t: Tensor) -> Tensor:
        return t.index_select(1, keep.to(t.device)) if t.dim() >= 2 and t.shape[:2] == (1, positions) else t

    return _rebuilt(batch, cut)
