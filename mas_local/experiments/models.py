"""The compared networks: an MLP, a small CNN and a small transformer on 8×8 digits, shared or multi-head output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import transformer

MODELS = ("mlp", "cnn", "transformer")
HIDDEN = 256  # width of the hidden layers (mlp) and of the cnn's linear layer
# per-model training defaults (epochs per task, Adam lr, batch size): the transformer needs more epochs and a
# larger lr to learn from 1078 images; batches of 64 keep its 8 epochs within the run's time budget
TRAINING_DEFAULTS = {"mlp": (5, 1e-3, 32), "cnn": (5, 1e-3, 32), "transformer": (8, 3e-3, 64)}
LAYER_TYPES = {
    "mlp": ("hidden Linear", "head"),
    "cnn": ("conv", "hidden Linear", "head"),
    "transformer": (
        "embeddings/positions",
        "attention q/k/v",
        "attention out",
        "MLP in",
        "MLP out",
        "norms",
        "head",
    ),
}


class MultiHead(nn.Module):
    """``n_heads`` linear heads of ``n_classes`` outputs in one weight matrix.

    With ``active = None`` the forward returns all heads' logits ``[B, n_heads·n_classes]``
    (training and evaluation pick each sample's head from that); with ``active = t`` it
    returns only head ``t``'s logits, which is how importance is estimated for task ``t``.
    """

    def __init__(self, in_features: int, n_heads: int, n_classes: int):
        super().__init__()
        ref = nn.Linear(in_features, n_heads * n_classes)
        self.weight = nn.Parameter(ref.weight.detach().clone())
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.n_heads, self.n_classes = n_heads, n_classes
        self.active: int | None = None

    def forward(self, h: Tensor) -> Tensor:
        if self.active is None:
            return F.linear(h, self.weight, self.bias)
        sl = slice(self.active * self.n_classes, (self.active + 1) * self.n_classes)
        return F.linear(h, self.weight[sl], self.bias[sl])


class Net(nn.Module):
    """A body (``nn.Sequential``) and a head (shared ``nn.Linear`` or :class:`MultiHead`)."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def build_model(kind: str, n_heads: int | None, n_classes: int) -> Net:
    """``mlp``, ``cnn`` or ``transformer`` on ``[N, 64]`` inputs; ``n_heads`` set means a :class:`MultiHead`."""
    features = HIDDEN
    if kind == "mlp":
        body = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU())
    elif kind == "cnn":
        body = nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, HIDDEN),
            nn.ReLU(),
        )
    elif kind == "transformer":
        body = transformer.Encoder()
        features = body.width
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
    head = nn.Linear(features, n_classes) if n_heads is None else MultiHead(features, n_heads, n_classes)
    return Net(body, head)


def logits(model: Net, x: Tensor, task_ids: Tensor) -> Tensor:
    """Each sample's logits from its own head (``task_ids``); a shared head ignores the ids."""
    out = model(x)
    head = model.head
    if isinstance(head, MultiHead) and head.active is None:
        out = out.view(out.shape[0], head.n_heads, head.n_classes)
        out = out[torch.arange(out.shape[0], device=out.device), task_ids]
    return out


class ActiveHead:
    """Context manager: inside it a multi-head model outputs only head ``head`` (no-op for a shared head)."""

    def __init__(self, model: Net, head: int | None):
        self.multi = model.head if isinstance(model.head, MultiHead) else None
        self.head = head

    def __enter__(self):
        if self.multi is not None:
            self.multi.active = self.head
        return self

    def __exit__(self, *exc):
        if self.multi is not None:
            self.multi.active = None


def _describe(module: nn.Module) -> str:
    if isinstance(module, MultiHead):
        return f"{module.n_heads} heads × {module.n_classes}, Linear {module.weight.shape[1]}→{module.weight.shape[0]}"
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        text = f"Conv {module.in_channels}→{module.out_channels} {kh}×{kw}"
        return text + (f" stride {module.stride[0]}" if module.stride != (1, 1) else "")
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features}→{module.out_features}"
    if isinstance(module, nn.LayerNorm):
        return f"LayerNorm {module.normalized_shape[0]}"
    if isinstance(module, transformer.Positions):
        return f"positions {module.weight.shape[0]}×{module.weight.shape[1]}"
    return type(module).__name__


def layer_type(name: str, module: nn.Module) -> str:
    """The layer type a module with parameters belongs to (one of :data:`LAYER_TYPES`), from its name and class."""
    if name == "head" or name.startswith("head."):
        return "head"
    found = transformer.layer_type(name, module)
    if found is not None:
        return found
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "hidden Linear"
    return type(module).__name__


def _transformer_layer(prefix: str) -> str:
    """``body.blocks.0.attn.q`` → ``block 1 attn.q``; ``body.pos`` → ``pos``."""
    parts = prefix.split(".")[1:]
    if len(parts) >= 2 and parts[0] == "blocks":
        return f"block {int(parts[1]) + 1} " + ".".join(parts[2:])
    return ".".join(parts)


def parameter_labels(model: Net) -> dict[str, dict[str, str]]:
    """Readable names of the parameter tensors, keyed by ``named_parameters`` name.

    ``body.0.weight`` of the MLP becomes ``{"layer": "layer 1", "module": "Linear 64→256",
    "tensor": "weight", "type": "hidden Linear"}``: the body's layers that hold parameters are
    numbered from 1, the output layer is ``head``; the transformer's layers keep their path
    (``block 1 attn.q``). ``type`` is the layer type (:func:`layer_type`).
    """
    labels: dict[str, dict[str, str]] = {}
    number = 0
    is_transformer = isinstance(getattr(model, "body", None), transformer.Encoder)
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if prefix == "head":
            layer = "head"
        elif is_transformer:
            layer = _transformer_layer(prefix)
        else:
            number += 1
            layer = f"layer {number}"
        kind = layer_type(prefix, module)
        for tensor, _ in own:
            labels[f"{prefix}.{tensor}"] = {"layer": layer, "module": _describe(module), "tensor": tensor, "type": kind}
    return labels
