"""``nn.Embedding``: a sample's gradient touches only the rows of its own tokens (never ``[B, vocab, dim]``)."""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import LayoutError
from .base import Rule, work_dtype


class EmbeddingRule(Rule):
    param_names = ("weight",)
    row_blocks = True

    @staticmethod
    def _flat(acc, site) -> tuple[Tensor, Tensor, Tensor]:
        """Token rows, their Δ rows and their sample index, padding tokens left out."""
        idx = site.x
        if idx.dim() == 0:
            raise LayoutError(
                f"module '{site.path}' (nn.Embedding) got a 0-d index; importance needs a batch dimension"
            )
        n = acc.batch_samples
        idx = site.batch_first(idx, site.x_dim).reshape(n, -1)
        d = site.batch_first(site.delta, site.out_dims[0]).reshape(n, idx.shape[1], -1)
        d = d.to(work_dtype(d))
        sample = torch.arange(n, device=idx.device).unsqueeze(1).expand_as(idx)
        m = site.module
        if m.padding_idx is None:  # every token counts: no boolean indexing (it copies and synchronises)
            return idx.reshape(-1), d.reshape(-1, d.shape[-1]), sample.reshape(-1)
        keep = idx != m.padding_idx
        return idx[keep], d[keep], sample[keep]

    @staticmethod
    def _segments(site, rows: Tensor, d: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sum Δ over equal (group, row) pairs; returns (keys, row of each segment, segment sums)."""
        m = site.module
        keys = group * m.num_embeddings + rows
        uniq, inv = torch.unique(keys, return_inverse=True)
        seg = torch.zeros(uniq.numel(), d.shape[1], device=d.device, dtype=d.dtype)
        seg.index_add_(0, inv, d)
        if m.scale_grad_by_freq:
            counts = torch.bincount(inv, minlength=uniq.numel()).to(seg.dtype)
            seg /= counts.unsqueeze(1)
        return uniq, uniq % m.num_embeddings, seg

    def add_sample_abs(self, acc, site, params):
        if "weight" not in params:
            return
        rows, d, sample = self._flat(acc, site)
        _, uniq_rows, seg = self._segments(site, rows, d, sample)
        total = acc.sum_of(params["weight"])
        total.index_add_(0, uniq_rows, seg.abs().to(total.dtype))

    def batch_grads(self, acc, site, params):
        if "weight" not in params:
            return {}
        w, m = params["weight"], site.module
        rows = site.x.reshape(-1)
        d = site.delta.reshape(rows.shape[0], -1)
        d = d.to(work_dtype(d))
        if m.padding_idx is not None:
            keep = rows != m.padding_idx
            rows, d = rows[keep], d[keep]
        _, uniq_rows, seg = self._segments(site, rows, d, torch.zeros_like(rows))
        g = torch.zeros(w.shape, dtype=seg.dtype, device=w.device)
        g.index_add_(0, uniq_rows, seg)
        return {"weight": g}

    def per_sample_grads(self, acc, site, params, rows):
        if "weight" not in params:
            return {}
        w = params["weight"]
        g = torch.zeros(rows.stop - rows.start, *w.shape, dtype=work_dtype(site.delta), device=w.device)
        self.add_per_sample_grads(acc, site, params, rows, {"weight": g})
        return {"weight": g}

    def add_per_sample_grads(self, acc, site, params, rows, into, block=None):
        if "weight" not in params:
            return
        tok, d, sample = self._flat(acc, site)
        if rows.start > 0 or rows.stop < acc.batch_samples:
            sel = (sample >= rows.start) & (sample < rows.stop)
            tok, d, sample = tok[sel], d[sel], sample[sel]
        if block is not None:  # only the tokens of the rows block
            sel = (tok >= block.start) & (tok < block.stop)
            tok, d, sample = tok[sel], d[sel], sample[sel]
        keys, uniq_rows, seg = self._segments(site, tok, d, sample - rows.start)
        if block is not None:  # keys of [len(rows), len(block)] instead of [len(rows), vocab]
            keys = (keys // site.module.num_embeddings) * (block.stop - block.start) + (uniq_rows - block.start)
        into["weight"].view(-1, params["weight"].shape[1]).index_add_(0, keys, seg.to(into["weight"].dtype))
