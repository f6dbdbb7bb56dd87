"""The leaves of nested call arguments and outputs, as ``torch.utils._pytree`` orders them, without its cost.

The engine flattens every captured call's arguments and outputs (and, on the first batch
of a pass, every torch function's). ``pytree.tree_flatten`` builds a spec tree for each, which
is most of the engine's fixed cost per module call. Plain tuples, lists and dicts are walked
here in the same order (dict values in insertion order); anything pytree treats specially
(namedtuples, return types, ``OrderedDict``, Hugging Face ``ModelOutput``, registered
classes) is handed to pytree, so the result is always ``tree_flatten(obj)[0]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten

# Leaves pytree never descends into, checked first because they are most of what calls pass.
_ATOMS = frozenset({Tensor, Parameter, int, float, bool, str, type(None), torch.dtype, torch.device})


def _extend(out: list, obj: Any) -> None:
    kind = type(obj)
    if kind in _ATOMS:
        out.append(obj)
    elif kind is tuple or kind is list:
        for x in obj:
            if type(x) in _ATOMS:
                out.append(x)
            else:
                _extend(out, x)
    elif kind is dict:
        for x in obj.values():
            if type(x) in _ATOMS:
                out.append(x)
            else:
                _extend(out, x)
    elif kind in SUPPORTED_NODES or isinstance(obj, tuple):  # namedtuples and return types: pytree's own rules
        out.extend(tree_flatten(obj)[0])
    else:
        out.append(obj)


def flat_leaves(obj: Any) -> list:
    """``tree_flatten(obj)[0]``: every leaf, tensors or not, in pytree's order."""
    if type(obj) is Tensor:
        return [obj]
    out: list = []
    _extend(out, obj)
    return out


def tensor_leaves(obj: Any) -> list[Tensor]:
    """The tensors among :func:`flat_leaves`."""
    if isinstance(obj, Tensor):
        return [obj]
    return [t for t in flat_leaves(obj) if isinstance(t, Tensor)]
