"""What a plan depends on: the batch signature, and (global mode) where the graph reads each parameter.

A plan (which module call computes which parameter, and where each call's samples are) is made
on the first batch of each *signature* — batch size, positions per sample, and the structure of the
batch (keys, nesting, each tensor's shape and dtype, every plain value such as a flag) — and made
again whenever the signature changes, so no size seen on one batch is taken for a fact about another.
In global mode the autograd graph of each batch also tells how many times each parameter is read;
a batch whose reads differ from its plan's batch (a branch taken only on some batches) is planned anew.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .batches import plain

_PLAIN = (int, float, bool, str, type(None))


def batch_signature(batch: Any, n: int, positions: int | None) -> tuple:
    """A hashable description of everything about a batch that can change the plan, but not its values."""
    leaves, spec = tree_flatten(plain(batch))
    parts = []
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            parts.append((tuple(leaf.shape), leaf.dtype, leaf.device))
        elif isinstance(leaf, _PLAIN):
            parts.append((type(leaf).__name__, leaf))
        else:
            parts.append(type(leaf).__name__)
    return (n, positions, str(spec), tuple(parts))


def read_counts(out: Tensor) -> dict[int, int]:
    """How many graph edges reach each leaf tensor that needs a gradient (by id), from ``out`` back."""
    counts: dict[int, int] = {}
    fn = out.grad_fn
    if fn is None:
        return counts
    seen = {fn}
    stack = [fn]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:  # AccumulateGrad: a read of a leaf (a parameter)
                counts[id(variable)] = counts.get(id(variable), 0) + 1
                continue
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return counts


class ReadCounter(TorchFunctionMode):
    """Local mode (no autograd graph to read): how many torch calls take each trainable parameter as an argument.

    Cheap enough for every batch: a parameter is recognised by its id (a live object's id is its own), with no
    ``isinstance`` (``Parameter``'s metaclass makes that a Python call). A batch whose counts differ from its
    plan's batch reads the parameters elsewhere (a branch on values) and is planned again.
    """

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names = names
        self.counts: dict[int, int] = {}
        self.paused = False  # streaming reduces calls inside the forward: the statistics' own reads do not count

    def _see(self, values: Any) -> None:
        names, counts = self.names, self.counts
        for a in values:
            key = id(a)
            if key in names:
                counts[key] = counts.get(key, 0) + 1
            elif type(a) in (list, tuple):  # one level: torch.cat([w, v]), F.linear's packed weights
                for b in a:
                    if id(b) in names:
                        counts[id(b)] = counts.get(id(b), 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            self._see(args)
            if kwargs:
                self._see(kwargs.values())
        return func(*args, **kwargs)


class PlanBook:
    """The plans of one pass, each kept under the batch signature it was made for, with what was learned about
    that signature: the parameters' reads on its planning batch, how often it called each module, which call
    layouts passed the self-check, and whether its batches are computed one sample at a time."""

    def __init__(self) -> None:
        self._plans: dict[tuple, Any] = {}
        self._reads: dict[tuple, dict[int, int]] = {}
        self._calls: dict[tuple, Counter] = {}
        self._checked: set[tuple] = set()
        self._reduced: set[tuple] = set()
        self.alone: set[tuple] = set()

    def plan(self, key: tuple) -> Any:
        return self._plans.get(key)

    def keep(self, key: tuple, plan: Any) -> None:
        self._plans[key] = plan

    def forget(self, key: tuple) -> None:
        self._plans.pop(key, None)
        self._reads.pop(key, None)
        self._calls.pop(key, None)
        self._reduced.discard(key)

    def reduced(self, key: tuple) -> bool:
        """Whether a batch of this signature went through the whole reduction (its rules ran on every call)."""
        return key in self._reduced

    def note_reduced(self, key: tuple) -> None:
        self._reduced.add(key)

    def calls(self, key: tuple) -> Counter | None:
        """How often the signature's planning batch (a batch whose calls were all kept) called each module."""
        return self._calls.get(key)

    def note_calls(self, key: tuple, calls: Counter) -> None:
        self._calls.setdefault(key, calls)

    def checked_any(self, key: tuple) -> bool:
        """Whether some call layouts of this signature passed the self-check."""
        return any(layouts[0] == key for layouts in self._checked)

    def same_reads(self, key: tuple, counts: dict[int, int]) -> bool:
        """Whether a batch reads the parameters as the signature's planning batch did (the first counts given
        for a signature are its planning batch's)."""
        return self._reads.setdefault(key, counts) == counts

    def needs_check(self, layouts: tuple) -> bool:
        return layouts not in self._checked

    def checked(self, layouts: tuple) -> None:  # (key, call layouts)
        self._checked.add(layouts)
