"""The compared networks: an MLP and a small CNN on 8×8 digits, with a shared or a multi-head output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODELS = ("mlp", "cnn")
HIDDEN = 256  # width of the hidden layers (mlp) and of the cnn's linear layer


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
    """``mlp`` or ``cnn`` on ``[N, 64]`` inputs; ``n_heads`` set means a :class:`MultiHead`."""
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
    else:
        raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
    head = nn.Linear(HIDDEN, n_classes) if n_heads is None else MultiHead(HIDDEN, n_heads, n_classes)
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
    return type(module).__name__


def parameter_labels(model: Net) -> dict[str, dict[str, str]]:
    """Readable names of the parameter tensors, keyed by ``named_parameters`` name.

    ``body.0.weight`` of the MLP becomes ``{"layer": "layer 1", "module": "Linear 64→256",
    "tensor": "weight"}``: the body's layers that hold parameters are numbered from 1, the
    output layer is ``head``.
    """
    labels: dict[str, dict[str, str]] = {}
    number = 0
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own:
            continue
        if prefix == "head":
            layer = "head"
        else:
            number += 1
            layer = f"layer {number}"
        for tensor, _ in own:
            labels[f"{prefix}.{tensor}"] = {"layer": layer, "module": _describe(module), "tensor": tensor}
    return labels
