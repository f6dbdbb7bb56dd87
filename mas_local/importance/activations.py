"""Local MAS judged through an activation: which Linear/Conv layers use ``act(y)`` instead of ``y``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping

from torch import Tensor, nn

from ..config import Activation


def resolve_activations(model: nn.Module, activation: Activation) -> dict[int, Callable[[Tensor], Tensor]]:
    """``{id(module): act}`` for the Linear/Conv layers local MAS judges through an activation.

    ``activation`` is one callable for every Linear/Conv layer, or a mapping from
    qualified module names or glob patterns to callables (layers not matched keep
    their pre-activation output). The mode was checked by the config.
    """
    if activation is None:
        return {}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))}
    if callable(activation):
        return {id(m): activation for m in layers.values()}
    if not isinstance(activation, Mapping):
        raise TypeError(f"activation must be a callable or a mapping of module names to callables, got {activation!r}")
    chosen: dict[int, Callable[[Tensor], Tensor]] = {}
    for pattern, act in activation.items():
        if not callable(act):
            raise TypeError(f"activation[{pattern!r}] is not callable")
        hits = [m for name, m in layers.items() if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(
                f"activation key {pattern!r} matches no Linear/Conv layer; layers are e.g. {list(layers)[:5]}"
            )
        for m in hits:
            chosen[id(m)] = act
    return chosen
