"""What the pass guarantees around the model: state restored, unsupported set-ups refused, outputs checked,
and the per-call adjustments of captured calls (shared calls expanded, activations applied)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import ImportanceError
from .capture import Site
from .statistics import all_finite, widened


def _saved_buffers(model: nn.Module) -> list:
    return [(m, k, b, b.detach().clone()) for m in model.modules() for k, b in m._buffers.items() if b is not None]


def _restore_buffers(saved: list) -> None:
    with torch.no_grad():
        for m, k, b, copy in saved:
            m._buffers[k] = b
            b.copy_(copy)


@contextlib.contextmanager
def preserved_state(model: nn.Module):
    """Run a throw-away forward: buffers (BatchNorm statistics) and RNG states are restored afterwards."""
    saved = _saved_buffers(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            _restore_buffers(saved)


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Buffers are restored if the body raises (a failed estimate leaves the model as it was)."""
    saved = _saved_buffers(model)
    try:
        yield
    except BaseException:
        _restore_buffers(saved)
        raise


@contextlib.contextmanager
def without_kv_cache(model: nn.Module):
    """Hugging Face models with ``config.use_cache`` build a key/value cache in each forward and hand it to their
    attention layers, which append to it: a layer re-run per sample would see its keys twice. The cache only
    serves generation, so the pass runs with it off (the outputs are the same) and restores the setting."""
    configs = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is True and all(c is not cfg for c in configs):
            configs.append(cfg)
    for cfg in configs:
        cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in configs:
            cfg.use_cache = True


def check_checkpointing(model: nn.Module) -> None:
    """Reentrant activation checkpointing hides module calls from ``autograd.grad``: refuse it clearly."""
    for m in model.modules():
        func = getattr(m, "_gradient_checkpointing_func", None)
        if not (m.training and getattr(m, "gradient_checkpointing", False) and func is not None):
            continue
        if getattr(func, "keywords", {}).get("use_reentrant", False):
            raise ImportanceError(
                f"{type(m).__name__} uses reentrant activation checkpointing (use_reentrant=True), which runs its "
                "forward without autograd; estimate in eval mode (the default eval_mode=True turns checkpointing "
                "off) or enable checkpointing with use_reentrant=False"
            )


def expand_shared(site: Site, mask: Tensor) -> None:
    """Local mode, a call shared by the batch whose output is laid out ``[1, T, ...]`` (a position embedding):
    every sample sees it over its own real positions, so it becomes that call expanded to the batch."""
    n, positions = mask.shape
    y = site.outputs[0] if site.outputs else None
    if y is None or y.dim() < 2 or y.shape[0] != 1 or y.shape[1] != positions:
        return
    leaves, spec = tree_flatten((site.args, site.kwargs))
    for i, t in enumerate(leaves):
        if isinstance(t, Tensor) and not isinstance(t, nn.Parameter) and t.dim() >= 1 and t.shape[0] == 1:
            leaves[i] = t.expand(n, *t.shape[1:])
            site.in_dims[i] = 0
    site.args, site.kwargs = tree_unflatten(leaves, spec)
    site.outputs[0] = y.expand(n, *y.shape[1:])
    site.out_dims[0] = 0


def check_output(out: Any, n: int) -> None:
    if not isinstance(out, Tensor):
        raise ImportanceError(f"output_fn returned {type(out).__name__}, expected a Tensor")
    if out.dim() == 0 or out.shape[0] != n:
        raise ImportanceError(
            f"the model output has shape {tuple(out.shape)}, which has no batch dimension of size {n}; "
            "MAS needs one output per sample (pass output_fn to select it)"
        )
    if not all_finite(out):
        raise ImportanceError("the model output contains NaN or Inf values; importance would be meaningless")


def apply_activation(site: Site, act: Callable[[Tensor], Tensor]) -> None:
    """Judge the layer by a = act(y): hebbian pairs |a| with |x|; sample/batch use Δ = ∂(½‖a‖²)/∂y."""
    y = site.outputs[0]
    with torch.enable_grad():
        leaf = y.detach().requires_grad_(True)
        a = act(leaf)
        if not isinstance(a, Tensor) or a.shape != y.shape:
            raise ImportanceError(
                f"the activation for {type(site.module).__name__} must return a tensor of the layer's output "
                f"shape {tuple(y.shape)}, got {tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}"
            )
        (delta,) = torch.autograd.grad(0.5 * widened(a).pow(2).sum(), leaf, allow_unused=True)
    site.activated = a.detach()
    site.deltas[0] = torch.zeros_like(y) if delta is None else delta
