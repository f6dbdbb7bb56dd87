"""Small models with ragged shapes used across the tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, i=13, h=11, o=5):
        super().__init__()
        self.fc1 = nn.Linear(i, h)
        self.norm = nn.LayerNorm(h)
        self.fc2 = nn.Linear(h, h, bias=False)
        self.head = nn.Linear(h, o)

    def forward(self, x):
        x = torch.tanh(self.norm(self.fc1(x)))
        return self.head(torch.relu(self.fc2(x)))


class TokenModel(nn.Module):
    """Embedding (with padding index) -> per-token Linear -> LayerNorm -> Linear over tokens [B, T, ·]."""

    def __init__(self, vocab=17, d=6, o=5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.proj = nn.Linear(d, 9)
        self.norm = nn.LayerNorm(9)
        self.out = nn.Linear(9, o)

    def forward(self, idx):
        return self.out(torch.tanh(self.norm(self.proj(self.emb(idx)))))


class ConvNet(nn.Module):
    """Grouped, strided, dilated, 'same' and reflect-padded convolutions, a Conv1d, BatchNorm (eval)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), groups=2, bias=False)
        self.c3 = nn.Conv2d(6, 6, 3, dilation=2, padding="same", padding_mode="reflect")
        self.c4 = nn.Conv2d(6, 4, 2, padding=(1, 0), padding_mode="circular", groups=2)
        self.c1d = nn.Conv1d(4, 3, 3, stride=2, padding=1)
        self.head = nn.Linear(3, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.c1(x)))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x)) + x
        x = self.c4(x)  # [B, 4, H', W']
        x = self.c1d(x.flatten(2))  # treat positions as a 1-D signal
        return self.head(x.mean(-1))


class ResBlock(nn.Module):
    def __init__(self, c, stride=1, groups=1, dilation=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.skip = nn.Conv2d(c, c, 1, stride=stride, bias=False) if stride != 1 else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x))


class ResNetSmall(nn.Module):
    """A ResNet-style CNN: stem, grouped/strided/dilated residual blocks, BatchNorm, pooled Linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = ResBlock(8, stride=2, groups=2)
        self.block2 = ResBlock(8, dilation=2)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)), inplace=True)
        x = self.block2(self.block1(x))
        return self.fc(x.mean((2, 3)))


class Tied(nn.Module):
    """Tied input/output embedding and a layer called twice: parameters used at several sites."""

    def __init__(self, vocab=11, d=7):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        h = self.emb(idx)
        h = torch.tanh(self.mix(h))
        h = torch.tanh(self.mix(h))
        return self.head(h)


def tiny_llama(vocab=97, hidden=32, layers=2, tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model
