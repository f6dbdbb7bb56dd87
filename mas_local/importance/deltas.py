"""Δ of the captured calls: what each rule pairs with the calls' inputs (``docs/math.md``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ImportanceError
from .capture import Site
from .guards import apply_activation, expand_shared
from .masks import aligned_mask, masked_squared_norm, row_mask


def local_deltas(sites: list[Site], mask: Tensor | None, activation_of: dict) -> None:
    """Local mode: Δ = y (or ∂(½‖act(y)‖²)/∂y) of each call's first output, over real positions only."""
    for s in sites:
        s.outputs = [t.detach() for t in s.outputs]
        if mask is not None and not s.batched:
            expand_shared(s, mask)
        # a module is judged by its output as the model is: the tensor, or a tuple's first element
        s.deltas = [t if i == 0 and t.is_floating_point() else None for i, t in enumerate(s.outputs)]
        act = activation_of.get(id(s.module))
        if act is not None:
            apply_activation(s, act)
        s.padded = mask is not None and not bool(mask.all())
        if mask is None or s.delta is None:
            continue
        m = aligned_mask(s.outputs[0], s.out_dims[0], mask, features=True)
        if m is not None:  # ½‖y_k‖² over real positions only
            s.deltas[0] = s.deltas[0] * m
        if s.args and isinstance(s.x, Tensor) and s.x.is_floating_point():
            s.row_mask = row_mask(s.x, s.x_dim, mask)


def global_deltas(est: Any, out: Tensor, sites: list[Site]) -> None:
    """Global mode: Δ of every captured output by one ``autograd.grad`` of Σ_k‖f(x_k)‖² (real positions).

    Parameters no captured call computes are included: a gradient there means they reach the output
    another way, which is refused.
    """
    loss = masked_squared_norm(out, est._mask)
    if not loss.requires_grad:
        raise ImportanceError("the model output does not depend on any trainable parameter")
    targets = [t for s in sites for t in s.targets if t.requires_grad]
    covered = {id(p) for s in sites for _, params in est.plan.sites[id(s.module)].groups for p in params.values()}
    uncovered = [p for p in est.params.values() if id(p) not in covered]
    grads = torch.autograd.grad(loss, targets + uncovered, allow_unused=True)
    by_id = {id(t): g for t, g in zip(targets, grads[: len(targets)])}
    for s in sites:
        s.deltas = [by_id.get(id(t)) for t in s.targets]
    used_elsewhere = [est.names[id(p)] for p, g in zip(uncovered, grads[len(targets) :]) if g is not None]
    if used_elsewhere:
        raise ImportanceError(
            "these parameters reach the output through module calls other than those found on the first "
            f"batch of the pass, so their per-sample gradients cannot be attributed: {used_elsewhere}. "
            "Use estimator='batch' for this model, or freeze them (requires_grad=False)"
        )
