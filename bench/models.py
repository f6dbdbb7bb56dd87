"""Models and data for the end-to-end consolidation benchmarks (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.skip = nn.Conv2d(channels, channels, 1, stride=stride, bias=False) if stride != 1 else nn.Identity()

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.skip(x))


class ResNetCNN(nn.Module):
    """A ResNet-style CNN: BatchNorm (eval), in-place ReLU, a strided block, a pooled Linear head."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.block1 = ResBlock(width)
        self.block2 = ResBlock(width, stride=2)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)), inplace=True)
        return self.fc(self.block2(self.block1(x)).mean((2, 3)))


class TokenMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 1024):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def _tokens(vocab: int, batches: int, batch: int, seq: int, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (batch, seq), generator=g)} for _ in range(batches)]


def llama(hidden: int = 128, layers: int = 2, data=(4, 8, 64)):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=344 * hidden // 128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1024,
        max_position_embeddings=max(64, data[2]),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, _tokens(1024, *data)


def gpt2(hidden: int = 128, layers: int = 2, data=(4, 8, 64)):
    import transformers

    cfg = transformers.GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=4, vocab_size=1024, n_positions=max(64, data[2])
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    return model, _tokens(1024, *data)


def resnet(data=(4, 16, 32)):
    torch.manual_seed(0)
    model = ResNetCNN().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    batches, batch, side = data
    return model, [torch.randn(batch, 3, side, side, generator=g) for _ in range(batches)]


def token_mlp(data=(1, 32, 128)):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    batches, batch, seq = data
    return TokenMLP().eval(), [torch.randn(batch, seq, 256, generator=g) for _ in range(batches)]


def tiny_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.ReLU(), nn.Linear(64, 10)).eval()
    g = torch.Generator().manual_seed(1)
    return model, [torch.randn(16, 32, generator=g) for _ in range(4)]


def tiny_llama():
    return llama(hidden=64, layers=1, data=(4, 4, 16))


def gpt2_124m(data=(4, 4, 128)):
    """GPT-2 124M as ``GPT2Config()`` builds it: 12 layers of width 768, the full 50257-token vocabulary, the
    embedding tied to the LM head."""
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    model.config.use_cache = False
    return model, _tokens(50257, *data)


def llama_336m(data=(4, 4, 128)):
    """A Llama-shaped model of 336M parameters from a config: 24 layers of width 1024 (16 heads, 4 key/value
    heads), MLP 2816, a 32000-token vocabulary with an untied head."""
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=max(128, data[2]),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.config.use_cache = False
    return model, _tokens(32000, *data)


def gpt2_narrow(layers: int, data=(4, 4, 128)):
    """A deep, narrow GPT-2 for depth scaling: width 128, 4 heads, a 1024-token vocabulary."""
    return gpt2(hidden=128, layers=layers, data=data)
