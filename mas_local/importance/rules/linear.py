"""``nn.Linear`` (and ``MASLinear``): y = x Wᵀ + b over any number of leading dimensions."""

from __future__ import annotations

import torch
from torch import Tensor

from ... import ops
from ..statistics import widened
from .base import Rule, work_dtype


class LinearRule(Rule):
    param_names = ("weight", "bias")
    hebbian = True
    row_blocks = True
    #: the weight is laid out [in, out] (Hugging Face's Conv1D): every product swaps its operands
    transposed = False

    def _pair(self, out_side: Tensor, in_side: Tensor) -> tuple[Tensor, Tensor]:
        """The operands of a weight-shaped product, in the weight's layout."""
        return (in_side, out_side) if self.transposed else (out_side, in_side)

    @staticmethod
    def _rows(acc, site) -> tuple[Tensor, Tensor]:
        """Input and Δ as ``[n, positions, features]``."""
        x, d = site.x, site.delta
        if x.dim() == 1:  # an unbatched call in a one-sample batch: one position
            x, d = x.unsqueeze(0), d.unsqueeze(0)
        else:
            x, d = site.batch_first(x, site.x_dim), site.batch_first(d, site.out_dims[0])
        return x.reshape(acc.batch_samples, -1, x.shape[-1]), d.reshape(acc.batch_samples, -1, d.shape[-1])

    def add_sample_abs(self, acc, site, params):
        x, d = self._rows(acc, site)
        w, b = params.get("weight"), params.get("bias")
        if w is not None:
            if x.shape[1] == 1:  # one position per sample: Σ_k|Δ_k x_kᵀ| = |Δ|ᵀ|X| (each term is rank 1)
                ops.eager.abs_gemm_acc_(acc.sum_of(w), *self._pair(d[:, 0], x[:, 0]), 1.0, acc.backend, acc.precision)
            else:
                out_f, in_f = d.shape[-1], x.shape[-1]
                per_sample = acc.per_sample_scratch(out_f, in_f, x.device) + 4 * (x[0].numel() + d[0].numel())
                for rows in acc.chunks(x.shape[0], bytes_per_sample=per_sample):
                    ops.eager.per_sample_abs_acc_(
                        acc.sum_of(w), *self._pair(d[rows], x[rows]), 1.0, acc.backend, acc.precision
                    )
        if b is not None:
            acc.add_sum(b, widened(d).sum(1).abs().sum(0))

    def batch_grads(self, acc, site, params):
        # summed over every position of the batch: the layout does not matter
        dt = work_dtype(site.x, site.delta)
        x2 = site.x.reshape(-1, site.x.shape[-1]).to(dt)
        d2 = site.delta.reshape(-1, site.delta.shape[-1]).to(dt)
        out = {}
        if "weight" in params:
            a, b = self._pair(d2, x2)
            out["weight"] = a.t() @ b
        if "bias" in params:
            out["bias"] = d2.sum(0)
        return out

    def add_hebbian(self, acc, site, params):
        # every position is one event, so the layout of the batch does not matter here
        y = site.judged_output
        x2 = site.x.reshape(-1, site.x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        if site.row_mask is not None:  # real positions only
            x2, y2 = x2[site.row_mask], y2[site.row_mask]
        if "weight" in params:
            w = params["weight"]
            ops.eager.abs_gemm_acc_(acc.sum_of(w), *self._pair(y2, x2), 1.0, acc.backend, acc.precision)
            acc.add_count(w, x2.shape[0])
        if "bias" in params:
            b = params["bias"]
            acc.add_sum(b, widened(y2).abs().sum(0))
            acc.add_count(b, x2.shape[0])

    def per_sample_grads(self, acc, site, params, rows):
        k = rows.stop - rows.start
        dt = work_dtype(site.x, site.delta)
        out = {name: torch.zeros(k, *p.shape, dtype=dt, device=p.device) for name, p in params.items()}
        self.add_per_sample_grads(acc, site, params, rows, out)
        return out

    def add_per_sample_grads(self, acc, site, params, rows, into, block=None):
        x, d = self._rows(acc, site)
        dt = into[next(iter(into))].dtype if into else torch.float32
        x, d = x[rows], d[rows]
        if "weight" in params:
            a, b = self._pair(d, x)  # a: the weight's first dimension
            if block is not None:
                a = a[..., block]
            into["weight"].baddbmm_(a.to(dt).transpose(1, 2), b.to(dt))
        if "bias" in params:
            into["bias"].add_((d if block is None else d[..., block]).to(dt).sum(1))
