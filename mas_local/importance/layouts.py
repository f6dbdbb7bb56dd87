"""Where the batch dimension is in each tensor a module call sees.

Data batches are batch-first. Inside a model, most modules see their samples along
dimension 0; the torch modules that declare a layout are read by that declaration
(``docs/math.md``, "Layouts"):

- ``nn.MultiheadAttention``: query/key/value along dim 1 when ``batch_first=False``;
  ``key_padding_mask`` ``[B, S]`` along dim 0; a 2-D ``attn_mask`` is shared; a 3-D one
  (``[B·heads, L, S]``) cannot be split per sample and is refused.
- ``nn.RNN/LSTM/GRU``: the input along dim 1 unless ``batch_first``; hidden states
  ``[layers, B, H]`` always along dim 1; packed sequences are refused.
- ``nn.Transformer*`` with ``batch_first=False``: their sequence tensors along dim 1,
  masks as above, and every module they call (Linear, LayerNorm, ...) along dim 1.

Everything else: a tensor whose leading dimension equals the batch size is batched
along dim 0; one whose leading dimension is batch size × positions per sample holds the
samples' tokens flattened sample-major (``[B·T, ...]``, as MoE layers route them: ``FLAT``);
parameters and other tensors are shared by the batch. A shape cannot tell ``[T, B, ·]``
from ``[B, T, ·]`` when T == B: modules outside these types that run sequence-first
must be wrapped so that they see batch-first tensors. On the first batch of a pass the
engine also follows which tensors are computed from the batch's tensors: one whose size
says "batched" but that is not computed from the batch and whose slices differ (cache
positions ``[T]`` or relative-position buckets ``[T, T]`` when T == B) is shared.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..errors import ImportanceError
from .leaves import flat_leaves

FLAT = "tokens"  # batch dim marker: leading dim is B·T, sample-major
BatchDim = int | str | None

_CONTAINERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder, nn.TransformerDecoder)


def declares_layout(module: nn.Module) -> bool:
    return isinstance(module, (nn.MultiheadAttention, nn.RNNBase, nn.Transformer) + _CONTAINERS)


def is_sequence_first(module: nn.Module) -> bool:
    """Whether a torch module declares ``batch_first=False`` (for containers: through their attention)."""
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase, nn.Transformer)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and not module.layers[0].self_attn.batch_first
    return False


def _default_dim(t: Any, n: int, seq_first: bool, flat_rows: int | None) -> BatchDim:
    if not isinstance(t, Tensor):
        return None
    shape = t.shape
    if not shape:
        return None
    if seq_first:
        dim = 1 if len(shape) >= 2 and shape[1] == n else None
    elif shape[0] == n:
        dim = 0
    else:
        dim = FLAT if flat_rows is not None and shape[0] == flat_rows else None
    if dim is not None and isinstance(t, nn.Parameter):  # a parameter is never batched
        return None
    return dim


_FIRST_PARAM: dict[type, str | None] = {}


def _first_param(cls: type) -> str | None:
    """The name of the first parameter of ``cls.forward`` after ``self`` (``None``: none, or ``*args``)."""
    if cls not in _FIRST_PARAM:
        name = None
        try:
            params = list(inspect.signature(cls.forward).parameters.values())[1:]
            if params and params[0].kind in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
                name = params[0].name
        except (TypeError, ValueError):
            pass
        _FIRST_PARAM[cls] = name
    return _FIRST_PARAM[cls]


def positional_first(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call made with its first argument as a keyword (``self.lin(input=x)``) as the positional call it
    equals, so that rules find the input at ``args[0]`` (the probe and the capture both see calls this way)."""
    if args or not kwargs:
        return args, kwargs
    name = _first_param(type(module))
    if name is None or name not in kwargs:
        return args, kwargs
    rest = {k: v for k, v in kwargs.items() if k != name}
    return (kwargs[name],), rest


def _bound(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    sig = inspect.signature(type(module).forward)
    return dict(sig.bind(module, *args, **kwargs).arguments)


def _mask_dim(name: str, t: Tensor, module: nn.Module) -> int | None:
    if "key_padding_mask" in name:
        return 0
    if t.dim() >= 3:
        raise ImportanceError(
            f"{type(module).__name__} got a {t.dim()}-D {name} {tuple(t.shape)}: a per-sample-and-head mask "
            "cannot be split per sample; pass a 2-D mask (shared) or a key padding mask, or use estimator='batch'"
        )
    return None


def _declared_dim(module: nn.Module, name: str, t: Any, n: int) -> int | None:
    if not isinstance(t, Tensor):
        return None
    if "mask" in name:
        return _mask_dim(name, t, module)
    if isinstance(module, nn.RNNBase) and name == "hx":
        return 1 if t.dim() == 3 else None
    if t.dim() < 3:  # an unbatched call of a layout-declaring module
        return None
    return 1 if is_sequence_first(module) else 0


def input_dims(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    n: int,
    in_seq_first: bool,
    flat_rows: int | None = None,
    leaves: list | None = None,
) -> list[BatchDim]:
    """The batch dimension of each leaf of ``(args, kwargs)`` (``None``: shared by the batch).

    ``flat_rows`` is B·T when the batch has T > 1 positions per sample (else ``None``); ``leaves``
    is ``flat_leaves((args, kwargs))`` when the caller has it.
    """
    if leaves is None:
        leaves = flat_leaves((args, kwargs))
    if not declares_layout(module):
        return [_default_dim(t, n, in_seq_first, flat_rows) for t in leaves]
    dims: list[int | None] = []
    bound = _bound(module, args, kwargs)
    by_leaf: dict[int, int | None] = {}
    for name, value in bound.items():
        if name == "self":
            continue
        if isinstance(value, PackedSequence):  # pytree would flatten it into its data and lengths
            raise ImportanceError(
                f"{type(module).__name__} got a PackedSequence: per-sample importance needs padded batches "
                "(use estimator='batch' or pad the sequences)"
            )
        for leaf in flat_leaves(value):
            by_leaf[id(leaf)] = _declared_dim(module, name, leaf, n)
    for t in leaves:
        dim = by_leaf.get(id(t)) if isinstance(t, Tensor) else None
        if dim is not None and t.shape[dim] != n:
            layout = "sequence-first (batch_first=False)" if is_sequence_first(module) else "batch-first"
            raise ImportanceError(
                f"{type(module).__name__} is {layout}, so its batch is dimension {dim} of its input "
                f"{tuple(t.shape)}, but the batch has {n} samples. Data batches are batch-first: if the model "
                "takes [T, B, ...] input, wrap it so that batches are [B, T, ...] (transpose inside the wrapper)"
            )
        dims.append(dim)
    return dims


def output_dims(
    module: nn.Module, outputs: list[Tensor], n: int, in_seq_first: bool, flat_rows: int | None = None
) -> list[BatchDim]:
    """The batch dimension of each tensor leaf of a module's output."""
    if isinstance(module, nn.RNNBase):
        first = (0 if module.batch_first else 1) if outputs and outputs[0].dim() == 3 else None
        return [first] + [1 if t.dim() == 3 else None for t in outputs[1:]]
    if isinstance(module, nn.MultiheadAttention):
        first = (0 if module.batch_first else 1) if outputs and outputs[0].dim() == 3 else None
        return [first] + [0 if t.dim() >= 3 else None for t in outputs[1:]]
    if declares_layout(module):
        return [(1 if is_sequence_first(module) else 0) if t.dim() == 3 else None for t in outputs]
    return [_default_dim(t, n, in_seq_first, flat_rows) for t in outputs]
