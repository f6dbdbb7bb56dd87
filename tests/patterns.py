"""Module patterns of real models that a per-layer rule must not get wrong (issue: engine exactness)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ScaledLinear(nn.Linear):
    """A Linear subclass with its own forward: the Linear rule does not describe it."""

    def forward(self, x):
        return F.linear(x, 2 * self.weight, self.bias) + 0.5 * self.bias


class StdConv2d(nn.Conv2d):
    """Weight standardisation inside forward (as timm's StdConv2d)."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (w - mean) / torch.sqrt(var + 1e-5), self.bias)


class SubclassModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = StdConv2d(3, 4, 3, padding=1)
        self.lin = ScaledLinear(4, 5)

    def forward(self, x):
        return self.lin(torch.tanh(self.conv(x)).mean((2, 3)))


class Aliased(nn.Module):
    """A parameter registered on a module and on its child (as Opacus' DPLSTM does)."""

    def __init__(self):
        super().__init__()
        self.sub = nn.Linear(6, 4)
        self.alias = self.sub.weight
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.sub(x)))


class TiedOutside(nn.Module):
    """An embedding also used as the LM head through F.linear in the parent's forward."""

    def __init__(self, vocab=13, dim=6):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, idx):
        h = torch.tanh(self.mix(self.emb(idx)))
        return F.linear(h, self.emb.weight)


class Attention(nn.Module):
    """Batch-first data through nn.MultiheadAttention (either layout) with a key padding mask."""

    def __init__(self, batch_first: bool, dim=8):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(5, dim)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=batch_first)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x)
        pad = x[..., 0] > 1.0  # a per-sample key padding mask, from the data
        pad[:, 0] = False  # every sample keeps at least one key
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.mha(h, h, h, key_padding_mask=pad, need_weights=False)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.out(a)


class SeqFirstEncoder(nn.Module):
    """A batch-first model around a sequence-first nn.TransformerEncoderLayer."""

    def __init__(self, dim=8):
        super().__init__()
        self.inp = nn.Linear(5, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 2, dim_feedforward=12, dropout=0.0, batch_first=False)
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.layer(self.inp(x).transpose(0, 1)).transpose(0, 1)
        return self.out(h)


class Recurrent(nn.Module):
    """An LSTM whose final hidden state ([layers, B, H]: batch along dim 1) is part of the output."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = nn.LSTM(5, 6, num_layers=2, batch_first=batch_first)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        seq, (h, _) = self.rnn(x if self.batch_first else x.transpose(0, 1))
        last = h[-1]  # [B, H]
        seq = seq if self.batch_first else seq.transpose(0, 1)
        return self.out(seq.mean(1) + last)


class WeightNormed(nn.Module):
    """A parametrization: the Linear's weight is computed from two parameters inside its forward."""

    def __init__(self):
        super().__init__()
        self.lin = nn.utils.parametrizations.weight_norm(nn.Linear(5, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


class LowRankAdapter(nn.Module):
    """A user layer: y = x Wᵀ + b + (x Aᵀ) Bᵀ with W frozen or not (a LoRA-style adapter)."""

    def __init__(self, i, o, rank=2):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)
        self.lora_a = nn.Parameter(torch.randn(rank, i) * 0.3)
        self.lora_b = nn.Parameter(torch.randn(o, rank) * 0.3)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b)


class AdapterModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.adapter = LowRankAdapter(7, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.adapter(x)))
