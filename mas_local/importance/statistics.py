"""The sufficient statistics of an importance pass: a sum and a count per parameter.

Sums are float32, or float64 for a float64 parameter (:func:`sum_dtype`): never narrower than
float32 whatever the compute dtype, and never narrower than the parameter, so that a float64
model's Ω is not rounded (or underflowed) to float32.

Ω = sum / count. What is summed and counted depends on the estimator
(``docs/math.md``): ``sample`` adds Σ_k |g_k| and counts samples; ``batch`` adds
|g_B| / b_B and counts batches; ``hebbian`` adds |y|·|x| sums and counts events.
Sums and counts add up across batches, processes and resumed passes, which is what
lets :mod:`mas_local.distributed` all-reduce them and checkpoints resume them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ImportanceError

log = logging.getLogger("mas_local")

CHECKPOINT_VERSION = 2  # 2: batch estimator sums |g_B|/b_B and counts batches


def sum_dtype(p: Tensor) -> torch.dtype:
    """The dtype Ω of ``p`` is accumulated and returned in: float64 for float64, float32 otherwise."""
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def widened(t: Tensor) -> Tensor:
    """``t`` in the dtype statistics are computed in: float64 stays float64, anything else becomes float32."""
    return t if t.dtype == torch.float64 else t.float()


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite, with one reduction in the common case.

    A NaN or ±Inf element makes the sum NaN or ±Inf, so a finite sum proves them all finite; a sum that
    overflows is checked element by element.
    """
    if t.is_floating_point() and t.numel():
        t = t.detach()
        total = t.sum(dtype=torch.float32) if t.element_size() < 4 else t.sum()
        if math.isfinite(total.item()):
            return True
    return bool(torch.isfinite(t).all())


class Statistics:
    """Sums and counts keyed by parameter name, plus samples and batches seen."""

    def __init__(self, params: dict[str, nn.Parameter], fingerprint: dict[str, Any]) -> None:
        self.params = params
        self.names = {id(p): name for name, p in params.items()}
        self.fingerprint = fingerprint
        self.sums: dict[str, Tensor] = {}
        self.writes = 0  # additions so far: a batch that fails after some can tell that it must be undone
        self.counts: dict[str, int] = {name: 0 for name in params}
        self.seen: set[str] = set()  # parameters some module call reported
        # local hebbian: parameters judged by the sample statistic, averaged over every sample of the pass
        self.sampled: set[str] = set()
        self.samples = 0
        self.batches = 0

    def sum_shape(self, p: Tensor) -> torch.Size:
        """Shape of the sum kept for ``p`` (a subclass may keep only a shard)."""
        return p.shape

    def sum_of(self, p: Tensor) -> Tensor:
        """``p``'s sum, to add to in place (counted in :attr:`writes`)."""
        self.writes += 1
        name = self.names[id(p)]
        s = self.sums.get(name)
        if s is None:
            s = self.sums[name] = torch.zeros_like(p, dtype=sum_dtype(p))  # p's memory format (channels_last)
        return s

    def merge(self, other: Statistics) -> None:
        """Add ``other``'s sums and counts (a batch reduced apart, ``pipeline.reduce_captured``)."""
        for name, t in other.sums.items():
            self.sum_of(self.params[name]).add_(t)
        for name, c in other.counts.items():
            self.counts[name] += c
        self.sampled |= other.sampled
        self.seen |= other.seen

    def restart(self, counts: dict[str, int]) -> None:
        """Back to no sums and these counts (a batch that failed after adding to a pass that had nothing)."""
        self.sums.clear()
        self.counts.clear()
        self.counts.update(counts)

    def add_sum(self, p: Tensor, value: Tensor) -> None:
        s = self.sum_of(p)
        s.add_(value.to(s.dtype))

    def add_count(self, p: Tensor, count: int) -> None:
        self.writes += 1
        self.counts[self.names[id(p)]] += int(count)

    def count_all(self, count: int) -> None:
        """Every parameter's count grows by ``count`` (samples or batches: all share the denominator)."""
        self.writes += 1
        for name in self.params:
            self.counts[name] += int(count)

    def flush(self) -> None:
        """Hook for subclasses holding pending contributions (FSDP2 shards)."""

    # -- checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, ints and strings only: loads with ``torch.load(weights_only=True)``."""
        self.flush()
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "sums": {k: v.detach().cpu().clone() for k, v in self.sums.items()},
            "counts": dict(self.counts),
            "seen": sorted(self.seen),
            "sampled": sorted(self.sampled),
            "samples": int(self.samples),
            "batches": int(self.batches),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; refuses a state from another model or other settings."""
        if not isinstance(state, Mapping) or "fingerprint" not in state or "sums" not in state:
            raise ValueError("not an importance-pass checkpoint (missing 'fingerprint'/'sums')")
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"unsupported checkpoint version {state.get('version')!r}; expected {CHECKPOINT_VERSION}")
        want, got = self.fingerprint, state["fingerprint"]
        for key in ("mode", "estimator"):
            if got.get(key) != want[key]:
                raise ValueError(f"checkpoint was made with {key}={got.get(key)!r}, this pass uses {want[key]!r}")
        if [list(x) for x in got.get("params", [])] != want["params"]:
            theirs = {x[0]: x for x in got.get("params", [])}
            diff = [x for x in want["params"] if theirs.get(x[0]) != x]
            extra = sorted(set(theirs) - set(self.params))
            raise ValueError(
                "checkpoint is from another model: parameters differ in name, shape or dtype "
                f"(first mismatches: {diff[:3]}, unknown names: {extra[:3]})"
            )
        sums = {}
        for name, t in state["sums"].items():
            p = self.params.get(name)
            shape = tuple(self.sum_shape(p)) if p is not None else None
            # float32 sums of a float64 parameter: written before sums followed the parameter's width
            widens = p is not None and t.dtype == torch.float32 and sum_dtype(p) == torch.float64
            if (
                p is None
                or not isinstance(t, Tensor)
                or tuple(t.shape) != shape
                or (t.dtype != sum_dtype(p) and not widens)
            ):
                raise ValueError(f"checkpoint sums for {name!r} do not match the parameter")
            sums[name] = t.to(device=p.device, dtype=sum_dtype(p)).clone()
        counts = state["counts"]
        if set(counts) != set(self.params):
            raise ValueError("checkpoint counts do not match the parameters")
        self.sums = sums
        self.counts = {k: int(counts[k]) for k in self.params}
        self.seen = set(state.get("seen", []))
        self.sampled = set(state.get("sampled", []))
        self.samples = int(state["samples"])
        self.batches = int(state["batches"])

    # -- result -------------------------------------------------------------------
    def result(self, covers_all: bool = False, release: bool = False) -> dict[str, Tensor]:
        """Ω per parameter name (:func:`sum_dtype`, detached). Raises if any value is not finite.

        ``covers_all``: every parameter was computed (global batch through autograd), so none
        is reported as never run. ``release``: the pass is over, so Ω is divided in place in the
        accumulators and they are handed over (no second copy of Ω's size); the statistics are empty after.
        """
        self.flush()
        if self.batches == 0:
            raise ImportanceError("data yielded no batches; importance needs at least one")
        out = {}
        for name, p in self.params.items():
            s = self.sums.get(name)
            if s is None:
                s = torch.zeros(self.sum_shape(p), dtype=sum_dtype(p), device=p.device)
            c = self.samples if name in self.sampled else self.counts[name]
            if release:
                omega = (s.div_(c) if c > 0 else s).detach()
            else:
                omega = (s / c if c > 0 else s.clone()).detach()
            if not all_finite(omega):
                raise ImportanceError(f"importance of parameter {name!r} has NaN or Inf values")
            out[name] = omega
        missing = [] if covers_all else [name for name in self.params if name not in self.seen]
        if missing:
            log.warning("mas_local: these parameters' modules never ran, their importance is 0: %s", missing)
        if release:
            self.sums = {}
        return out
