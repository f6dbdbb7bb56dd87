"""Batches as users pass them: how to run the model on one, how many samples it holds, sanity checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import ImportanceError


def tensor_leaves(obj: Any) -> list[Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, Tensor)]


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


def call_model(model: nn.Module, batch: Any) -> Any:
    """Run the model on one batch: a Tensor, a tuple/list (first element is the input) or a dict of kwargs."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ImportanceError("a batch is an empty tuple/list")
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise ImportanceError(f"a batch must be a Tensor, a tuple/list or a dict, got {type(batch).__name__}")


def model_inputs(batch: Any) -> Any:
    """The part of a batch the model sees (labels in a tuple are ignored)."""
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def batch_size(batch: Any) -> int:
    """Number of samples: the leading dimension of the first tensor the model sees."""
    leaves = tensor_leaves(model_inputs(batch))
    if not leaves or leaves[0].dim() == 0:
        raise ImportanceError("a batch must hold a tensor with a leading batch dimension")
    return int(leaves[0].shape[0])


def check_batch(model: nn.Module, batch: Any, index: int) -> None:
    """Clear errors for inputs on the wrong device or in the wrong floating dtype."""
    params = list(model.parameters())
    if not params:
        return
    devices = {p.device for p in params}
    float_dtypes = {p.dtype for p in params if p.is_floating_point()}
    for t in tensor_leaves(model_inputs(batch)):
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
