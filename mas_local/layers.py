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

Hugging Face's ``Conv1D`` (GPT-2 family; weight ``[in, out]``) is swapped for
``MASConv1D``. ``transformers`` is an optional dependency that takes seconds to
import, so this module never imports it on its own: ``MASConv1D`` is created the
first time it is needed, which is when ``transformers.pytorch_utils`` has been
imported (a model holding a ``Conv1D`` exists) or when ``mas_local.layers.MASConv1D``
is accessed.
"""

from __future__ import annotations

import fnmatch
import importlib
import sys
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


TRANSFORMERS_CONV1D_MODULE = "transformers.pytorch_utils"
_mas_conv1d: type | None = None


def mas_conv1d_class(load: bool = False) -> type | None:
    """``MASConv1D``, the swap-in for ``transformers.pytorch_utils.Conv1D``; ``None`` if transformers is not loaded.

    The class is created once, when ``transformers.pytorch_utils`` is in ``sys.modules``
    (``load=True`` imports it first, raising ``ImportError`` without transformers).
    """
    global _mas_conv1d
    if _mas_conv1d is not None:
        return _mas_conv1d
    module = sys.modules.get(TRANSFORMERS_CONV1D_MODULE)
    if module is None and load:
        module = importlib.import_module(TRANSFORMERS_CONV1D_MODULE)
    conv1d = getattr(module, "Conv1D", None)
    if conv1d is None:
        return None

    class MASConv1D(_TapMixin, conv1d):
        """Hugging Face ``Conv1D`` (``y = x @ W + b``, weight ``[in, out]``) that reports to an importance pass."""

        _plain_type = conv1d  # what revert turns it back into

        def forward(self, x: Tensor) -> Tensor:
            return self._tapped(x, super().forward(x))

        def __repr__(self) -> str:
            return f"MASConv1D(nf={self.nf}, nx={self.nx})"

    # pickled by reference as mas_local.layers.MASConv1D (resolved by the module __getattr__ below)
    MASConv1D.__module__ = __name__
    MASConv1D.__qualname__ = "MASConv1D"
    _mas_conv1d = MASConv1D
    return MASConv1D


def __getattr__(name: str):
    if name == "MASConv1D":
        return mas_conv1d_class(load=True)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_BUILTIN_SWAPS: dict[type, type] = {nn.Linear: MASLinear, nn.Conv2d: MASConv2d}


def _swaps() -> dict[type, type]:
    """Plain layer type -> swap-in type, with ``Conv1D`` when transformers is loaded."""
    table = dict(_BUILTIN_SWAPS)
    mas_conv1d = mas_conv1d_class()
    if mas_conv1d is not None:
        table[mas_conv1d._plain_type] = mas_conv1d
    return table


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
    """Swap ``nn.Linear``/``nn.Conv2d`` (and Hugging Face ``Conv1D``) for their MAS layers in place; returns ``model``.

    ``include``/``exclude`` take a qualified module name or glob pattern
    (``"encoder.*"``; a name also selects everything below it), a module type,
    a list of those, or a predicate ``f(name, module) -> bool``. Only layers of
    exactly ``nn.Linear``/``nn.Conv2d``/``transformers.pytorch_utils.Conv1D``
    type are swapped (for ``MASLinear``/``MASConv2d``/``MASConv1D``); subclasses
    of them written by other libraries keep their class (they are still
    estimated through hooks).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    swaps = _swaps()
    for _, module in list(_selected(model, include, exclude, swaps)):
        module.__class__ = swaps[type(module)]
    return model


def revert(model: nn.Module) -> nn.Module:
    """Turn every ``MASLinear``/``MASConv2d``/``MASConv1D`` back into the plain layer; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"revert expects an nn.Module, got {type(model).__name__}")
    unswaps = {v: k for k, v in _swaps().items()}
    for _, module in list(_selected(model, None, None, unswaps)):
        module.__dict__.pop("_mas_tap", None)
        module.__class__ = unswaps[type(module)]
    return model
