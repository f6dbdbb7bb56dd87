"""The compared transformer: a small pre-LN encoder over the 8×8 digits, cut into 2×2 patches (ViT-style).

Every projection (patch embedding, attention q/k/v/out, MLP in/out) is a plain ``nn.Linear``, so
each estimator judges them as it would the same layers of a Hugging Face model; the learned
positions are one parameter of their own module. docs/compare.md ("Models") gives the sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGE = 8  # the digits are 8×8
PATCH = 2  # 2×2 patches: 16 tokens of 4 pixels
WIDTH = 32  # model width d
HEADS = 4
DEPTH = 2  # encoder blocks
MLP_RATIO = 2  # MLP hidden width = MLP_RATIO · d


class PatchEmbed(nn.Module):
    """``[N, 64]`` pixels (row-major 8×8) → ``[N, 16, d]``: each 2×2 patch's 4 pixels through one Linear."""

    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(PATCH * PATCH, width)

    def forward(self, x: Tensor) -> Tensor:
        n, side = x.shape[0], IMAGE // PATCH
        patches = x.reshape(n, side, PATCH, side, PATCH).permute(0, 1, 3, 2, 4).reshape(n, side * side, PATCH * PATCH)
        return self.proj(patches)


class Positions(nn.Module):
    """Learned absolute positions added to the tokens, one vector per patch."""

    def __init__(self, tokens: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(tokens, width) * 0.02)

    def forward(self, h: Tensor) -> Tensor:
        return h + self.weight


class SelfAttention(nn.Module):
    """Multi-head softmax self-attention with separate ``q``, ``k``, ``v`` and ``out`` Linear layers."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        n, t, c = h.shape

        def split(z: Tensor) -> Tensor:
            return z.view(n, t, self.heads, c // self.heads).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        return self.out(mixed.transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Pre-LN block: ``h + attn(LN(h))``, then ``h + mlp_out(GELU(mlp_in(LN(h))))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp_in = nn.Linear(width, mlp_ratio * width)
        self.mlp_out = nn.Linear(mlp_ratio * width, width)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h))
        return h + self.mlp_out(F.gelu(self.mlp_in(self.norm2(h))))


class Encoder(nn.Module):
    """Patches → positions → ``DEPTH`` blocks → final LayerNorm → mean over tokens: ``[N, 64]`` → ``[N, d]``."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH, heads: int = HEADS, mlp_ratio: int = MLP_RATIO):
        super().__init__()
        self.patch = PatchEmbed(width)
        self.pos = Positions((IMAGE // PATCH) ** 2, width)
        self.blocks = nn.ModuleList([Block(width, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.width = width

    def forward(self, x: Tensor) -> Tensor:
        h = self.pos(self.patch(x))
        for block in self.blocks:
            h = block(h)
        return self.norm(h).mean(1)


def layer_type(name: str, module: nn.Module) -> str | None:
    """The transformer's layer type of a module with parameters (``None`` for other modules)."""
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.LayerNorm):
        return "norms"
    if isinstance(module, Positions) or name.endswith("patch.proj"):
        return "embeddings/positions"
    if ".attn." in f".{name}":
        return "attention q/k/v" if leaf in ("q", "k", "v") else "attention out"
    if leaf == "mlp_in":
        return "MLP in"
    if leaf == "mlp_out":
        return "MLP out"
    return None
