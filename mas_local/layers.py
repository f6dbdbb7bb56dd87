"""Drop-in layers and the model surgery that swaps them in and out.

``MASLinear`` and ``MASConv2d`` are subclasses of the torch layers with the same
parameters, buffers and outputs. During an importance pass the estimator sets a
*tap* on them, which the layer calls from its own forward: the swapped layers
report their inputs and outputs without any hook objects on the model (hooks are
what the estimator uses for every other module). Outside an importance pass the
tap is ``None`` and the forward is exactly the torch one.

``convert`` changes the class of matching layers in place (no copy, no new
parameters), so a converted model's ``state_dict()`` is the unconverted one's and
loads with ``strict=True`` both ways; ``revert`` changes it back.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable

from torch import Tensor, nn

Selector = None | str | type | Callable[[str, nn.Module], bool] | Iterable[str | type]


class _TapMixin:
    # Set by the importance estimator for the duration of one pass; called as
    # tap(module, args, kwargs, output) and returns the output the model continues with.
    _mas_tap = None

    def _tapped(self, x: Tensor, y: Tensor) -> Tensor:
        tap = self._mas_tap
        return y if tap is None else tap(self, (x,), {}, y)


class MASLinear(_TapMixin, nn.Linear):
    """``nn.Linear`` that reports its input and output to an active importance pass."""

    def forward(self, input: Tensor) -> Tensor:
        return self._tapped(input, super().forward(input))


class MASConv2d(_TapMixin, nn.Conv2d):
    """``nn.Conv2d`` that reports its input and output to an active importance pass."""

    def forward(self, input: Tensor) -> Tensor:
        return self._tapped(input, super().forward(input))


_SWAPS: dict[type, type] = {nn.Linear: MASLinear, nn.Conv2d: MASConv2d}
_UNSWAPS: dict[type, type] = {v: k for k, v in _SWAPS.items()}


def _matcher(selector: Selector) -> Callable[[str, nn.Module], bool] | None:
    """Turn include/exclude into a predicate on (qualified name, module)."""
    if selector is None:
        return None
    if callable(selector) and not isinstance(selector, type):
        return selector
    items = [selector] if isinstance(selector, (str, type)) else list(selector)
    for item in items:
        if not isinstance(item, (str, type)):
            raise TypeError(f"include/exclude items must be names, glob patterns or module types, got {item!r}")

    def match(name: str, module: nn.Module) -> bool:
        for item in items:
            if isinstance(item, type):
                if isinstance(module, item):
                    return True
            elif name == item or fnmatch.fnmatchcase(name, item) or name.startswith(item + "."):
                return True
        return False

    return match


def _selected(model: nn.Module, include: Selector, exclude: Selector, table: dict[type, type]):
    inc, exc = _matcher(include), _matcher(exclude)
    for name, module in model.named_modules():
        if type(module) not in table:
            continue
        if inc is not None and not inc(name, module):
            continue
        if exc is not None and exc(name, module):
            continue
        yield name, module


def convert(model: nn.Module, include: Selector = None, exclude: Selector = None) -> nn.Module:
    """Swap ``nn.Linear``/``nn.Conv2d`` for ``MASLinear``/``MASConv2d`` in place; returns ``model``.

    ``include``/``exclude`` take a qualified module name or glob pattern
    (``"encoder.*"``; a name also selects everything below it), a module type,
    a list of those, or a predicate ``f(name, module) -> bool``. Only layers of
    exactly ``nn.Linear``/``nn.Conv2d`` type are swapped; subclasses of them
    written by other libraries keep their class (they are still estimated
    through hooks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    for _, module in list(_selected(model, include, exclude, _SWAPS)):
        module.__class__ = _SWAPS[type(module)]
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn every ``MASLinear``/``MASConv2d`` back into the plain torch layer; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    for _, module in list(_selected(model, None, None, _UNSWAPS)):
        module.__dict__.pop("_mas_tap", None)
        module.__class__ = _UNSWAPS[type(module)]
    return model
