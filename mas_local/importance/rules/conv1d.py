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

import torch

from ... import ops
from ...layers import TRANSFORMERS_CONV1D_MODULE, mas_conv1d_class
from .base import Rule
from .linear import LinearRule

log = logging.getLogger("mas_local")


class Conv1DRule(LinearRule):
    """Importance of ``transformers.pytorch_utils.Conv1D`` / ``MASConv1D`` parameters (``weight [in, out]``)."""

    param_names = ("weight", "bias")
    hebbian = True

    def add_sample_abs(self, acc, site, params):
        x, d = self._rows(acc, site)
        w, b = params.get("weight"), params.get("bias")
        if w is not None:
            if x.shape[1] == 1:  # one position per sample: Σ_k|x_k Δ_kᵀ| = |X|ᵀ|Δ| (each term is rank 1)
                ops.eager.abs_gemm_acc_(acc.sum_of(w), x[:, 0], d[:, 0], 1.0, acc.backend, acc.precision)
            else:
                in_f, out_f = x.shape[-1], d.shape[-1]
                per_sample = acc.per_sample_scratch(in_f, out_f, x.device) + 4 * (x[0].numel() + d[0].numel())
                for rows in acc.chunks(x.shape[0], bytes_per_sample=per_sample):
                    ops.eager.per_sample_abs_acc_(acc.sum_of(w), x[rows], d[rows], 1.0, acc.backend, acc.precision)
        if b is not None:
            acc.add_sum(b, d.float().sum(1).abs().sum(0))

    def batch_grads(self, acc, site, params):
        x2 = site.x.reshape(-1, site.x.shape[-1]).float()
        d2 = site.delta.reshape(-1, site.delta.shape[-1]).float()
        out = {}
        if "weight" in params:
            out["weight"] = x2.t() @ d2
        if "bias" in params:
            out["bias"] = d2.sum(0)
        return out

    def add_hebbian(self, acc, site, params):
        # Ω_ij = (1/R) Σ_r |x_ri||y_rj|: every position is one event, the layout does not matter
        y = site.judged_output
        x2 = site.x.reshape(-1, site.x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        if site.row_mask is not None:  # real positions only
            x2, y2 = x2[site.row_mask], y2[site.row_mask]
        if "weight" in params:
            w = params["weight"]
            ops.eager.abs_gemm_acc_(acc.sum_of(w), x2, y2, 1.0, acc.backend, acc.precision)
            acc.add_count(w, x2.shape[0])
        if "bias" in params:
            b = params["bias"]
            acc.add_sum(b, y2.float().abs().sum(0))
            acc.add_count(b, x2.shape[0])

    def per_sample_grads(self, acc, site, params, rows):
        x, d = self._rows(acc, site)
        x, d = x[rows].float(), d[rows].float()
        out = {}
        if "weight" in params:
            out["weight"] = torch.einsum("bti,bto->bio", x, d)
        if "bias" in params:
            out["bias"] = d.sum(1)
        return out


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
