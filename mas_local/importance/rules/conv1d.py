"""Hugging Face ``Conv1D`` (GPT-2 family): ``y = x @ W + b`` with the weight laid out ``[in, out]``.

It is a Linear layer with a transposed weight (``docs/math.md``), so its statistics are
the Linear ones with the operands of each product swapped: ``|X|ᵀ|Y|`` is ``[in, out]``
like the weight, and the per-sample gradient of sample b is ``X_bᵀ Δ_b``. Nothing is
transposed or copied.

``transformers`` is optional and slow to import, so this file never imports it. The rule
is registered for ``Conv1D`` and ``MASConv1D`` by the registry itself, on the first rule
lookup after ``transformers.pytorch_utils`` has been imported (a model holding a ``Conv1D``
can only exist then): no import hook (``docs/rules.md``, "Optional dependencies").
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ...layers import TRANSFORMERS_CONV1D_MODULE, mas_conv1d_class
from .base import Rule
from .linear import LinearRule


class Conv1DRule(LinearRule):
    """Importance of ``transformers.pytorch_utils.Conv1D`` / ``MASConv1D`` parameters (``weight [in, out]``)."""

    transposed = True  # the Linear rule's products with their operands swapped


class PendingRegistration:
    """Registers the Conv1D rule once ``transformers.pytorch_utils`` is loaded; ``__call__`` is a dict lookup
    until then, and nothing after."""

    def __init__(self, register: Callable[[type, Rule], None], rule: Rule) -> None:
        self.register, self.rule, self.done = register, rule, False

    def __call__(self) -> None:
        if self.done or TRANSFORMERS_CONV1D_MODULE not in sys.modules:
            return
        mas_conv1d = mas_conv1d_class()
        self.done = True
        if mas_conv1d is None:  # pragma: no cover - transformers without Conv1D
            return
        self.register(mas_conv1d._plain_type, self.rule)
        self.register(mas_conv1d, self.rule)
