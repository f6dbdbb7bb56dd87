"""Hugging Face ``Conv1D`` (GPT-2 family): ``y = x @ W + b`` with the weight laid out ``[in, out]``.

It is a Linear layer with a transposed weight (``docs/math.md``), so its statistics are
the Linear ones with the operands of each product swapped: ``|X|ᵀ|Y|`` is ``[in, out]``
like the weight, and the per-sample gradient of sample b is ``X_bᵀ Δ_b``. Nothing is
transposed or copied.

``transformers`` is optional and slow to import, so this file never imports it. The rule
is registered for ``Conv1D`` and ``MASConv1D`` when ``transformers.pytorch_utils`` is
loaded: at once if it already is, otherwise by a one-shot import hook that fires when
that module has finished executing (``docs/rules.md``, "Optional dependencies").
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
from collections.abc import Callable
from typing import Any

from ...layers import TRANSFORMERS_CONV1D_MODULE, mas_conv1d_class
from .base import Rule
from .linear import LinearRule

log = logging.getLogger("mas_local")


class Conv1DRule(LinearRule):
    """Importance of ``transformers.pytorch_utils.Conv1D`` / ``MASConv1D`` parameters (``weight [in, out]``)."""

    transposed = True  # the Linear rule's products with their operands swapped


def _register(register: Callable[[type, Rule], None], rule: Rule) -> None:
    mas_conv1d = mas_conv1d_class()
    if mas_conv1d is None:  # pragma: no cover - transformers without Conv1D
        return
    register(mas_conv1d._plain_type, rule)
    register(mas_conv1d, rule)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once the module ``name`` has executed, then leaves ``sys.meta_path``.

    It finds nothing itself: for ``name`` it asks the finders after it for the spec and wraps
    that spec's loader so that ``exec_module`` calls ``callback`` after the module's code.
    """

    def __init__(self, name: str, callback: Callable[[], None]) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ChainedLoader(spec.loader, self._fire)
        return spec

    def _fire(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            self.callback()
        except Exception as exc:  # never break the user's import of transformers
            log.warning("mas_local: could not register the Conv1D importance rule (%s: %s)", type(exc).__name__, exc)


class _ChainedLoader(importlib.abc.Loader):
    """The original loader, with a callback after ``exec_module``; everything else is delegated."""

    def __init__(self, loader: Any, after: Callable[[], None]) -> None:
        self._loader, self._after = loader, after

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._after()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


def register_when_loaded(register: Callable[[type, Rule], None], rule: Rule) -> None:
    """Register ``rule`` for ``Conv1D`` and ``MASConv1D`` now, or when ``transformers.pytorch_utils`` is imported."""
    if TRANSFORMERS_CONV1D_MODULE in sys.modules:
        _register(register, rule)
        return
    if not any(isinstance(f, _AfterImport) and f.name == TRANSFORMERS_CONV1D_MODULE for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(TRANSFORMERS_CONV1D_MODULE, lambda: _register(register, rule)))
