"""A grammar of real-model patterns for the MAS fuzzer (tests/test_fuzz.py).

``build_case(seed)`` returns a float64 model made of a stem, 1–4 random blocks and a head, its
data (two batches of unequal size), the same samples one by one and unpadded (what the oracles
run), and the local judge map (parameter name -> path of the module whose output judges it; ""
is the model). Sizes are tiny and coincide on purpose (T == B, C == B, an expert with B tokens).

Families (the layout the blocks see):
  vec  [B, C]              tensor batches, or dicts {"x", "route"} when an MoE block needs routes
  seq  [B, T, C]           float sequences, no mask
  img  [B, C, H, W]        features-last blocks run on [B, H, W, C]
  tok  [B, T, C]           dict batches {"input_ids", "attention_mask"}, right-padded; every
                           block is per-position or causal, so padding changes nothing
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tests.patterns import ScaledLinear, StdConv2d  # the subclasses with a forward of their own

VOCAB = 11
MARK = VOCAB - 1  # first token of every sample of a later batch: takes the batch-dependent branch
MAX_POS = 8


# ----------------------------------------------------------------------------- helpers


def _lin(c_in, c_out, r, bias=None):
    return nn.Linear(c_in, c_out, bias=r.random() < 0.8 if bias is None else bias)


def _heads(c):
    return 2 if c % 2 == 0 else 1


class Mul(nn.Module):
    """A parameter-free module that reads the parameter passed to it."""

    def forward(self, h, s):
        return h * s


class Gain(nn.Module):
    """Its own parameter ``gain`` is read in its forward hook."""

    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c) / c**0.5)
        self.gain = nn.Parameter(1 + 0.3 * torch.randn(c))
        self.register_forward_hook(_gain_hook)

    def forward(self, h):
        return torch.tanh(F.linear(h, self.w))


def _gain_hook(module, args, output):
    return output * module.gain


class TReads(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.randn(c, c) / c**0.5)
        self.v = nn.Parameter(torch.randn(c, c) / c**0.5)

    def forward(self, h):
        return torch.tanh(h @ self.w.T) + 0.2 * (h @ self.v.mT)


class LearnedPos(nn.Embedding):
    """BART's learned positions: called on a float [B, T] tensor, uses only its shape."""

    def forward(self, x):
        b, t = x.shape[:2]
        return super().forward(torch.arange(t, device=self.weight.device).expand(b, -1))


def _causal(t, device=None):
    return torch.triu(torch.ones(t, t, dtype=torch.bool, device=device), 1)


# ----------------------------------------------------------------------------- blocks
# Each block: forward(h, **needs) on its layout; ``judge`` maps block-relative parameter names to
# block-relative module paths ("" = the block) for parameters not judged by the module registering them.


class Block(nn.Module):
    families: tuple = ("vec", "seq", "tok", "img")
    layout = "last"  # "last": any [..., C]; "seq": [B, T, C]; "img": [B, C, H, W]; "vec": [B, C]
    needs: tuple = ()

    def judge(self):
        return {}


class Linear_(Block):
    name = "linear"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        return torch.tanh(self.lin(h))


class LinearKw(Block):
    name = "linear-kwarg"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        return torch.tanh(self.lin(input=h))


class LinearSubclass(Block):
    name = "linear-subclass"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = ScaledLinear(c, c)

    def forward(self, h):
        return torch.tanh(self.lin(h))


class LinearTwice(Block):
    name = "linear-twice"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        return torch.tanh(self.lin(torch.tanh(self.lin(h))))


class TiedTwo(Block):
    name = "tied-two-modules"

    def __init__(self, c, r, info):
        super().__init__()
        self.a = _lin(c, c, r)
        self.b = _lin(c, c, r)
        self.b.weight = self.a.weight

    def forward(self, h):
        return torch.tanh(self.b(torch.tanh(self.a(h))))


class Alias(Block):
    name = "alias-parent-child"

    def __init__(self, c, r, info):
        super().__init__()
        self.sub = _lin(c, c, r)
        self.alias = self.sub.weight

    def forward(self, h):
        return self.sub(h) + 0.3 * torch.tanh(F.linear(h, self.alias))

    def judge(self):
        return {"alias": ""}  # read in sub and in this forward


class ArgParam(Block):
    name = "param-as-argument"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)
        self.scale = nn.Parameter(1 + 0.3 * torch.randn(c))
        self.mul = Mul()

    def forward(self, h):
        return self.mul(torch.tanh(self.lin(h)), self.scale)

    def judge(self):
        return {"scale": "mul"}


class HookParam(Block):
    name = "param-in-forward-hook"

    def __init__(self, c, r, info):
        super().__init__()
        self.g = Gain(c)

    def forward(self, h):
        return self.g(h)


class TransposeReads(Block):
    name = "reads-.T-.mT"

    def __init__(self, c, r, info):
        super().__init__()
        self.t = TReads(c)

    def forward(self, h):
        return self.t(h)


class ParentT(Block):
    name = "weight.T-in-parent"

    def __init__(self, c, r, info):
        super().__init__()
        self.proj = _lin(c, c, r)

    def forward(self, h):
        return torch.tanh(self.proj(h) + 0.2 * (h @ self.proj.weight.T))

    def judge(self):
        return {"proj.weight": ""}


class DetachHead(Block):
    name = "detach-head"

    def __init__(self, c, r, info):
        super().__init__()
        self.a = _lin(c, c, r)
        self.head = _lin(c, c, r)

    def forward(self, h):
        h2 = torch.tanh(self.a(h))
        return self.head(h2.detach()) + 0.5 * h2


class DataRead(Block):
    name = ".data-read"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        return torch.tanh(self.lin(h) + 0.1 * F.linear(h, self.lin.weight.data))


class Branch(Block):
    name = "branch-later-batch"
    needs = ("later",)

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)
        self.extra = _lin(c, c, r)  # never called: its weight is read here, on later batches only

    def forward(self, h, later=False):
        y = torch.tanh(self.lin(h))
        if later:
            y = y + 0.3 * F.linear(h, self.extra.weight)
        return y

    def judge(self):
        return {"extra.weight": ""}


class WeightNorm(Block):
    name = "weight-norm"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = nn.utils.parametrizations.weight_norm(_lin(c, c, r))

    def forward(self, h):
        return torch.tanh(self.lin(h))

    def judge(self):
        return {"lin.parametrizations.weight.original0": "lin", "lin.parametrizations.weight.original1": "lin"}


class MLP(Block):
    name = "mlp"

    def __init__(self, c, r, info):
        super().__init__()
        self.net = nn.Sequential(_lin(c, 2 * c, r), nn.GELU(), _lin(2 * c, c, r))

    def forward(self, h):
        return h + self.net(h)


class LayerNorm_(Block):
    name = "layernorm"

    def __init__(self, c, r, info):
        super().__init__()
        self.norm = nn.LayerNorm(c, bias=r.random() < 0.8)

    def forward(self, h):
        return self.norm(h)


class RMSNorm_(Block):
    name = "rmsnorm"

    def __init__(self, c, r, info):
        super().__init__()
        self.norm = nn.RMSNorm(c)

    def forward(self, h):
        return self.norm(h)


class BatchNorm1d_(Block):
    name = "batchnorm1d"
    families = ("vec", "seq", "tok")
    layout = "any"

    def __init__(self, c, r, info):
        super().__init__()
        self.bn = nn.BatchNorm1d(c)

    def forward(self, h):
        return self.bn(h) if h.dim() == 2 else self.bn(h.mT).mT


class MoE(Block):
    """Top-1/top-2 routing with a router Linear, experts on gathered rows ``flat[idx]``, index_add_.

    The data's ``route`` [..., 2] forces each token's chosen experts (a large bias on the router
    logits); the gates are the router's softmax over the chosen ones, so the router has gradients.
    """

    families = ("vec", "seq")
    needs = ("route",)

    def __init__(self, c, r, info):
        super().__init__()
        self.top = r.choice([1, 2])
        self.name = f"moe-top{self.top}"
        self.skip_empty = r.random() < 0.5
        self.router = _lin(c, 4, r)
        mlp = r.random() < 0.4
        self.experts = nn.ModuleList(
            nn.Sequential(_lin(c, c + 1, r), nn.Tanh(), _lin(c + 1, c, r)) if mlp else _lin(c, c, r) for _ in range(4)
        )

    def forward(self, h, route):
        c = h.shape[-1]
        flat = h.reshape(-1, c)
        rt = route.reshape(-1, 2)
        logits = self.router(flat)
        bias = 1e3 * F.one_hot(rt[:, 0], 4)
        if self.top == 2:
            bias = bias + 5e2 * F.one_hot(rt[:, 1], 4)
        top = (logits.detach() + bias).topk(self.top, dim=1).indices  # [N, k]
        gates = torch.softmax(logits.gather(1, top), dim=1)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            idx, slot = (top == e).nonzero(as_tuple=True)
            if idx.numel() == 0 and self.skip_empty:
                continue
            out.index_add_(0, idx, gates[idx, slot].unsqueeze(1) * expert(flat[idx]))
        return h + out.reshape(h.shape)


class FlatSampleMajor(Block):
    name = "flatten-sample-major"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        b, t, c = h.shape
        return torch.tanh(self.lin(h.reshape(b * t, c))).reshape(b, t, c)


class FlatTimeMajor(Block):
    name = "flatten-T-major"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.lin = _lin(c, c, r)

    def forward(self, h):
        b, t, c = h.shape
        return torch.tanh(self.lin(h.transpose(0, 1).reshape(t * b, c))).reshape(t, b, c).transpose(0, 1)


class MHA(Block):
    families = ("seq", "tok")  # (order: the first default seeds put it in a padded token model)
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.batch_first = r.random() < (0.3 if info["family"] == "tok" else 0.5)
        self.causal = info["family"] == "tok" or r.random() < 0.5
        self.name = "mha-" + ("batch-first" if self.batch_first else "seq-first")
        self.mha = nn.MultiheadAttention(c, _heads(c), batch_first=self.batch_first)

    def forward(self, h):
        q = h if self.batch_first else h.transpose(0, 1)
        mask = _causal(h.shape[1], h.device) if self.causal else None
        a, _ = self.mha(q, q, q, attn_mask=mask, need_weights=False)
        return h + (a if self.batch_first else a.transpose(0, 1))

    def judge(self):
        return {"mha.out_proj.weight": "mha", "mha.out_proj.bias": "mha"}


class RNN(Block):
    families = ("tok", "seq")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.batch_first = r.random() < (0.3 if info["family"] == "tok" else 0.5)
        kind = r.choice([nn.LSTM, nn.GRU])
        self.name = f"{kind.__name__.lower()}-" + ("batch-first" if self.batch_first else "seq-first")
        self.rnn = kind(c, c, num_layers=r.choice([1, 2]), batch_first=self.batch_first)
        self.use_last = info["family"] == "seq" and r.random() < 0.5  # h_n [layers, B, H]: padding-dependent

    def forward(self, h):
        y, hn = self.rnn(h if self.batch_first else h.transpose(0, 1))
        y = y if self.batch_first else y.transpose(0, 1)
        if self.use_last:
            last = (hn[0] if isinstance(hn, tuple) else hn)[-1]
            y = y + last.unsqueeze(1)
        return y


class GemmaAttention(Block):
    """Causal attention with q_norm/k_norm over d after the [B, heads, T, d] transpose (Gemma 3)."""

    name = "per-head-qk-norm"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.h = _heads(c)
        self.d = c // self.h
        self.q, self.k, self.v, self.o = (_lin(c, c, r) for _ in range(4))
        self.q_norm = nn.RMSNorm(self.d)
        self.k_norm = nn.LayerNorm(self.d) if r.random() < 0.5 else nn.RMSNorm(self.d)

    def forward(self, x):
        b, t, _ = x.shape

        def heads(z):
            return z.view(b, t, self.h, self.d).transpose(1, 2)

        q, k, v = self.q_norm(heads(self.q(x))), self.k_norm(heads(self.k(x))), heads(self.v(x))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        att = torch.softmax(att.masked_fill(_causal(t, x.device), float("-inf")), -1)
        return x + self.o((att @ v).transpose(1, 2).reshape(b, t, self.h * self.d))


class BartPositions(Block):
    name = "float-BT-to-module"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.pos = LearnedPos(MAX_POS, c)

    def forward(self, h):
        return h + self.pos(h[:, :, -1])


class NanoGPTPositions(Block):
    name = "pos-emb-arange"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.wpe = nn.Embedding(MAX_POS, c)

    def forward(self, h):
        return h + self.wpe(torch.arange(h.shape[1], device=h.device))


class DebertaRepeat(Block):
    name = "shared-output-repeat"
    families = ("seq", "tok")
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        self.rel_emb = nn.Embedding(MAX_POS, c)
        self.rel_lin = _lin(c, c, r)

    def forward(self, h):
        t = h.shape[1]
        rel = self.rel_lin(self.rel_emb(torch.arange(t, device=h.device))[None])  # [1, T, C], shared
        return h + torch.tanh(rel).repeat(h.shape[0], 1, 1)


class Conv1dMT(Block):
    name = "conv1d-on-.mT"
    families = ("seq",)
    layout = "seq"

    def __init__(self, c, r, info):
        super().__init__()
        k = r.choice([1, 3])
        d = r.choice([1, 2])
        pad = d * (k - 1) // 2
        modes = ["zeros"] + (["replicate", "circular"] if pad <= info["t_min"] else [])
        modes += ["reflect"] if pad < info["t_min"] else []
        groups = r.choice([g for g in (1, c) if c % g == 0])
        self.pm = r.choice(modes)
        self.conv = nn.Conv1d(
            c, c, k, padding=pad, dilation=d, groups=groups, padding_mode=self.pm, bias=r.random() < 0.8
        )

    def forward(self, h):
        return h + torch.tanh(self.conv(h.mT)).mT


class Conv1dStride(Block):
    """A strided Conv1d that changes T, then the tokens flattened [B*T', C] through a Linear."""

    name = "conv1d-stride-flatten"
    families = ("seq",)
    layout = "seq"
    last_only = True

    def __init__(self, c, r, info):
        super().__init__()
        pm = r.choice(["zeros", "replicate", "circular"] + (["reflect"] if info["t_min"] > 1 else []))
        self.conv = nn.Conv1d(c, c, 3, stride=2, padding=1, padding_mode=pm)
        self.lin = _lin(c, c, r)

    def forward(self, h):
        b = h.shape[0]
        z = self.conv(h.mT).mT  # [B, T', C]
        t2, c = z.shape[1], z.shape[2]
        return torch.tanh(self.lin(z.reshape(b * t2, c))).reshape(b, t2, c)


class Conv2d_(Block):
    families = ("img",)
    layout = "img"

    def __init__(self, c, r, info):
        super().__init__()
        k = r.choice([1, 3])
        d = r.choice([1, 1, 2])
        pad = d * (k - 1) // 2
        small = min(info["hw"])
        modes = ["zeros"] + (["replicate", "circular"] if pad <= small else [])
        modes += ["reflect"] if pad < small else []
        self.pm = r.choice(modes)
        groups = r.choice([g for g in (1, c) if c % g == 0])
        padding = "same" if (r.random() < 0.2 and k > 1) else pad
        self.name = f"conv2d-{self.pm}"
        self.conv = nn.Conv2d(
            c, c, k, padding=padding, dilation=d, groups=groups, padding_mode=self.pm, bias=r.random() < 0.8
        )

    def forward(self, h):
        return h + torch.tanh(self.conv(h))


class Conv2dStride(Block):
    name = "conv2d-stride"
    families = ("img",)
    layout = "img"
    last_only = True

    def __init__(self, c, r, info):
        super().__init__()
        small = min(info["hw"])
        pm = r.choice(["zeros", "replicate", "circular"] + (["reflect"] if small > 1 else []))
        self.name = f"conv2d-stride-{pm}"
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1, padding_mode=pm)

    def forward(self, h):
        return torch.tanh(self.conv(h))


class StdConv(Block):
    name = "stdconv2d-subclass"
    families = ("img",)
    layout = "img"

    def __init__(self, c, r, info):
        super().__init__()
        self.conv = StdConv2d(c, c, 3, padding=1)

    def forward(self, h):
        return h + torch.tanh(self.conv(h))


class BatchNorm2d_(Block):
    name = "batchnorm2d"
    families = ("img",)
    layout = "img"

    def __init__(self, c, r, info):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, h):
        return self.bn(h)


class GroupNorm_(Block):
    name = "groupnorm"
    families = ("img", "seq")
    layout = "any"

    def __init__(self, c, r, info):
        super().__init__()
        # at least 2 channels a group: a sample of one position must still have more than one value a group
        self.gn = nn.GroupNorm(r.choice([g for g in range(1, c + 1) if c % g == 0 and c // g >= 2] or [1]), c)

    def forward(self, h):
        return self.gn(h) if h.dim() == 4 else self.gn(h.mT).mT


class Swin(Block):
    """Windows folded into the batch [B*nW, ws*ws, C], LayerNorm/Linear there, a shared relative bias
    [1, heads, ws², ws²] added to the [B*nW, heads, ws², ws²] scores."""

    name = "swin-windows"
    families = ("img",)
    layout = "img"

    def __init__(self, c, r, info):
        super().__init__()
        hh, ww = info["hw"]
        self.ws = r.choice([w for w in (1, 2, 3) if hh % w == 0 and ww % w == 0])
        self.h = _heads(c)
        self.d = c // self.h
        n = self.ws * self.ws
        self.norm = nn.LayerNorm(c)
        self.qkv = _lin(c, 3 * c, r)
        self.proj = _lin(c, c, r)
        self.rel_bias = nn.Parameter(0.5 * torch.randn(1, self.h, n, n))

    def forward(self, x):
        b, c, hh, ww = x.shape
        ws, n = self.ws, self.ws * self.ws
        w = x.permute(0, 2, 3, 1).reshape(b, hh // ws, ws, ww // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        qkv = self.qkv(self.norm(w)).reshape(-1, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(self.d) + self.rel_bias, -1)
        y = self.proj((att @ v).transpose(1, 2).reshape(-1, n, c))
        y = y.reshape(b, hh // ws, ww // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hh, ww, c)
        return x + y.permute(0, 3, 1, 2)


BLOCKS = [
    Linear_, LinearKw, LinearSubclass, LinearTwice, TiedTwo, Alias, ArgParam, HookParam, TransposeReads, ParentT,
    DetachHead, DataRead, Branch, WeightNorm, MLP, LayerNorm_, RMSNorm_, BatchNorm1d_, MoE, FlatSampleMajor,
    FlatTimeMajor, MHA, RNN, GemmaAttention, BartPositions, NanoGPTPositions, DebertaRepeat, Conv1dMT, Conv1dStride,
    Conv2d_, Conv2dStride, StdConv, BatchNorm2d_, GroupNorm_, Swin,
]  # fmt: skip


# ----------------------------------------------------------------------------- the model


class FuzzModel(nn.Module):
    def __init__(self, family, stem, blocks, head, head_kind):
        super().__init__()
        self.family, self.head_kind = family, head_kind
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x=None, route=None, input_ids=None, attention_mask=None):
        if self.family == "tok":
            later = bool((input_ids[:, 0] == MARK).all())
            h = self.stem(input_ids)
        else:
            later = bool((x.flatten(1)[:, 0] > 4).all())
            h = self.stem(x)
        ctx = {"later": later, "route": route}
        for blk in self.blocks:
            kw = {k: ctx[k] for k in blk.needs}
            if self.family == "img" and blk.layout == "last":
                h = blk(h.permute(0, 2, 3, 1), **kw).permute(0, 3, 1, 2)
            else:
                h = blk(h, **kw)
        if self.family == "img":
            h = h.mean((2, 3))
        if self.head_kind == "tied-@T":
            return h @ self.stem.weight.T
        if self.head_kind == "tied-F.linear":
            return F.linear(h, self.stem.weight)
        return self.head(h)


@dataclass
class Case:
    seed: int
    family: str
    patterns: list  # pattern name per block (index i -> blocks.i), then stem/head patterns
    model: nn.Module
    data: list  # batches as the library gets them
    singles: list  # per batch: that batch's samples, each alone and unpadded (a batch of one)
    judge: dict  # parameter name -> module path ("" = the model)
    chunk_bytes: int
    extras: list = field(default_factory=list)  # stem/head/data patterns

    def owner(self, name: str) -> str:
        """The pattern a parameter belongs to."""
        if name.startswith("blocks."):
            return self.patterns[int(name.split(".")[1])]
        return f"{self.family}-stem/head"

    def judge_modules(self, model):
        return {n: model.get_submodule(p) for n, p in self.judge.items()}

    def describe(self) -> str:
        return (
            f"seed={self.seed} family={self.family} blocks={self.patterns} extras={self.extras} "
            f"chunk_bytes={self.chunk_bytes}"
        )


def _pick_blocks(r, family, first, info):
    pool = [b for b in BLOCKS if family in b.families]
    chosen = [first] + [r.choice(pool) for _ in range(r.randint(0, 3))]
    # a block that changes the geometry goes last (and at most once); routes follow the input's shape
    last = [b for b in chosen if getattr(b, "last_only", False)]
    chosen = [b for b in chosen if not getattr(b, "last_only", False)] + last[:1]
    return chosen


def build_case(seed: int) -> Case:
    r = random.Random(seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    first = BLOCKS[seed % len(BLOCKS)]  # consecutive seeds cover every block, in a rotating family
    family = first.families[(seed + seed // len(BLOCKS)) % len(first.families)]
    b1 = r.randint(2, 5)
    b2 = r.choice([b for b in range(2, 6) if b != b1])
    sizes = [b1, b2]
    ts = [r.randint(1, 5) for _ in sizes]
    if r.random() < 0.6:  # T == B, often on the later batch
        i = r.choice([1, 1, 0])
        ts[i] = sizes[i]
    if family == "vec":
        ts = [None, None]
    c = r.randint(3, 7)
    if r.random() < 0.3:
        c = max(3, r.choice([b1, b2] + [t for t in ts if t]))
    hw = (r.randint(2, 5), r.randint(2, 5)) if family == "img" else None
    if hw and r.random() < 0.3:
        hw = (b1, b1)
    info = {"family": family, "t_min": min(t for t in ts) if ts[0] else 1, "hw": hw}
    if family == "img":
        ts = [None, None]
    classes = _pick_blocks(r, family, first, info)
    blocks = [cls(c, r, info) for cls in classes]
    patterns = [blk.name for blk in blocks]
    extras = []

    f_in = r.randint(3, 7)
    head_kind = "linear"
    if family == "tok":
        padding_idx = 0 if r.random() < 0.5 else None
        stem = nn.Embedding(VOCAB, c, padding_idx=padding_idx)
        extras.append("embedding-padding_idx" if padding_idx == 0 else "embedding")
        head_kind = r.choice(["linear", "tied-@T", "tied-F.linear"])
        head = _lin(c, VOCAB, r) if head_kind == "linear" else None
        extras.append(f"lm-head-{head_kind}")
    elif family == "img":
        stem = nn.Conv2d(r.randint(1, 3), c, 3, padding=1)
        head = _lin(c, r.randint(2, 4), r)
    else:
        stem = _lin(f_in, c, r)
        head = _lin(c, r.randint(2, 4), r)
    model = FuzzModel(family, stem, blocks, head, head_kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn_like(m.running_mean))
                m.running_var.copy_(0.5 + torch.rand_like(m.running_var))
    model = model.double().eval()

    judge = {}
    for i, blk in enumerate(blocks):
        for n, p in blk.judge().items():
            judge[f"blocks.{i}.{n}"] = f"blocks.{i}" + (f".{p}" if p else "")
    if head_kind.startswith("tied"):
        judge["stem.weight"] = ""

    has_branch = any(isinstance(b, Branch) for b in blocks)
    moe = any(isinstance(b, MoE) for b in blocks)
    data, singles = [], []
    for i, (b, t) in enumerate(zip(sizes, ts)):
        if family == "tok":
            ids = torch.randint(1, MARK, (b, t), generator=g)
            lengths = [r.randint(1, t) for _ in range(b)]
            lengths[r.randrange(b)] = t
            if t > 1 and all(n == t for n in lengths):
                lengths[(lengths.index(t) + 1) % b] = r.randint(1, t - 1)
            if has_branch and i > 0:
                ids[:, 0] = MARK
            mask = torch.zeros(b, t, dtype=torch.long)
            for k, n in enumerate(lengths):
                mask[k, :n] = 1
                ids[k, n:] = 0  # the pad token
            data.append({"input_ids": ids, "attention_mask": mask})
            singles.append(
                [
                    {"input_ids": ids[k : k + 1, :n], "attention_mask": mask[k : k + 1, :n]}
                    for k, n in enumerate(lengths)
                ]
            )
            continue
        if family == "img":
            x = torch.randn(b, stem.in_channels, *hw, generator=g, dtype=torch.float64)
        elif family == "seq":
            x = torch.randn(b, t, f_in, generator=g, dtype=torch.float64)
        else:
            x = torch.randn(b, f_in, generator=g, dtype=torch.float64)
        if has_branch and i > 0:
            x.view(b, -1)[:, 0] = 5.0
        if moe:
            batch = {"x": x, "route": _routes(r, b, t, first_batch=i == 0)}
        else:
            batch = x
        data.append(batch)
        singles.append(
            [
                {k: v[j : j + 1] for k, v in batch.items()} if isinstance(batch, dict) else batch[j : j + 1]
                for j in range(b)
            ]
        )
    if moe:
        extras.append("dict-batch-with-routes")
    if family == "tok":
        extras.append("right-padded")
    chunk_bytes = 1 if r.random() < 0.35 else 256 << 20
    return Case(seed, family, patterns, model, data, singles, judge, chunk_bytes, extras)


def _routes(r, b, t, first_batch):
    """[b, (t,) 2] chosen experts. First batch: expert 0 gets exactly b tokens (every position 0, or every
    sample), expert 1 exactly one token, expert 2 none; later batches: anything."""
    n_tok = b * (t or 1)
    if first_batch:
        r1 = []
        for _k in range(b):
            for j in range(t or 1):
                r1.append(0 if j == 0 else 3)
        if t and t > 1:
            r1[r.choice([i for i, e in enumerate(r1) if e == 3])] = 1
        elif r.random() < 0.5:
            r1[r.randrange(n_tok)] = 1
        r2 = [r.choice([e for e in (0, 1, 3) if e != a]) for a in r1]
    else:
        r1 = [r.randrange(4) for _ in range(n_tok)]
        r2 = [r.choice([e for e in range(4) if e != a]) for a in r1]
    route = torch.tensor(list(zip(r1, r2)), dtype=torch.long)
    return route.view(b, t, 2) if t else route.view(b, 2)
