"""The rule interface: how one module type turns a captured call into importance statistics.

A rule receives a :class:`~mas_local.importance.capture.Site` (one call of the module:
``site.args``, ``site.kwargs``, ``site.outputs``, the batch dimension of each,
and ``site.deltas``, the output gradients Δ: ∂loss/∂y in global mode, y itself —
or ∂(½‖act(y)‖²)/∂y — in local mode), the parameters it must compute (a dict of
names relative to the module → parameters), and an accumulator ``acc``:

``acc.batch_samples``                      samples in the batch
``acc.sum_of(p)``              the sum kept for ``p`` (float32; float64 for float64 ``p``) (add to it in place)
``acc.add_sum(p, value)``      ``sum_of(p) += value``
``acc.add_count(p, k)``        hebbian only: k more co-activation events for ``p``
``acc.chunks(n, bytes)``       slices of the batch whose work fits ``chunk_bytes``
``acc.per_sample_scratch(out, in, device)``   bytes per sample the per-sample op needs beyond its operands
``acc.backend``, ``acc.precision``   settings for the fused ops (:mod:`mas_local.ops`)
Rules run after the batch's forward, when nothing is captured, so a rule may re-run its module.

Only :meth:`Rule.per_sample_grads` is required; the other methods have exact
defaults built on it, which a rule overrides when it knows a faster form. The
documentation with a worked example is ``docs/rules.md``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...errors import LayoutError


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype per-sample gradients are computed in: float64 for a float64 model (cancellations inside one
    sample's gradient, a bias a softmax or a norm removes, stay below its noise), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors if t is not None) else torch.float32


class Rule:
    """Importance of the parameters of one module type (see the module docstring)."""

    #: names (relative to the module) the rule computes; ``None``: any parameter the module reads
    param_names: tuple[str, ...] | None = None
    #: methods of the registered type whose override voids the rule (the subclass gets the generic rule)
    relies_on: tuple[str, ...] = ("forward",)
    #: whether :meth:`add_hebbian` is implemented (local ``hebbian``); otherwise local ``sample`` is used
    hebbian: bool = False
    #: whether :meth:`per_sample_grads` re-runs the module (it then needs the parameter values, see FSDP2)
    reruns_module: bool = False
    #: add_per_sample_grads takes ``block`` (rows of a parameter's first dimension) and writes only those
    row_blocks: bool = False

    def handles(self, local_name: str | None) -> bool:
        return local_name is not None and (self.param_names is None or local_name in self.param_names)

    def check(self, acc: Any, site: Any, per_sample: bool) -> None:
        """Raise :class:`ImportanceError` when this call cannot be estimated as asked."""
        if per_sample and site.x_dim is None and acc.batch_samples != 1:
            raise LayoutError(
                f"module '{site.path}' ({type(site.module).__name__}) sees an input of shape "
                f"{tuple(site.x.shape)} without the batch dimension ({acc.batch_samples} samples); per-sample "
                "estimators need it (use estimator='batch')"
            )

    def per_sample_grads(self, acc: Any, site: Any, params: dict[str, nn.Parameter], rows: slice) -> dict[str, Tensor]:
        """Per-sample gradients ``[len(rows), *p.shape]`` (float32) of Σ⟨y, Δ⟩ for samples ``rows``."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_sample_grads")

    def add_per_sample_grads(
        self,
        acc: Any,
        site: Any,
        params: dict[str, nn.Parameter],
        rows: slice,
        into: dict[str, Tensor],
        block: slice | None = None,
    ) -> None:
        """``into[name] += per-sample gradients`` (float32 ``[len(rows), *p.shape]``): tied parameters sum their
        calls' per-sample gradients here before the absolute value. Rules override it to write in place.

        ``block`` (only passed to rules with ``row_blocks = True``, for one parameter at a time): only the rows
        ``block`` of the parameter's first dimension, ``into[name]`` being ``[len(rows), len(block), ...]``."""
        for name, g in self.per_sample_grads(acc, site, params, rows).items():
            into[name].add_(g if block is None else g[:, block])

    def add_sample_abs(self, acc: Any, site: Any, params: dict[str, nn.Parameter]) -> None:
        """``sum_of(p) += Σ_k |g_k(p)|`` over the batch, for parameters computed at this call only."""
        numel = sum(p.numel() for p in params.values())
        for rows in acc.chunks(acc.batch_samples, bytes_per_sample=4 * max(1, numel)):
            for name, g in self.per_sample_grads(acc, site, params, rows).items():
                acc.add_sum(params[name], g.abs().sum(0))

    def batch_grads(self, acc: Any, site: Any, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        """``Σ_k g_k(p)`` over the batch, signed (the absolute value is taken after all calls of a batch)."""
        total: dict[str, Tensor] = {}
        numel = sum(p.numel() for p in params.values())
        for rows in acc.chunks(acc.batch_samples, bytes_per_sample=4 * max(1, numel)):
            for name, g in self.per_sample_grads(acc, site, params, rows).items():
                total[name] = g.sum(0) if name not in total else total[name] + g.sum(0)
        return total

    def add_hebbian(self, acc: Any, site: Any, params: dict[str, nn.Parameter]) -> None:
        """Local hebbian: add |y|·|x| co-activation sums and their event counts (when ``hebbian``)."""
        raise NotImplementedError
