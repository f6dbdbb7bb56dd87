"""The fused penalty for parameters spread over several devices (model parallelism, pipeline stages).

``mas_local::penalty_grad_`` serves the tensors of one device per call (one
multi-tensor launch). :func:`penalty_grad_by_device` groups the tensors by device,
makes one call per device, and sums the per-device values on one device in a fixed
order (the order in which the devices first appear in ``params``), so the value is
deterministic for a given parameter order.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _device_key(t: Tensor):
    """The grouping key of a tensor (its device)."""
    return t.device


def group_by_device(params: list[Tensor]) -> dict:
    """``{device: [indices into params]}``, devices in order of first appearance, indices ascending."""
    groups: dict = {}
    for i, p in enumerate(params):
        groups.setdefault(_device_key(p), []).append(i)
    return groups


def penalty_grad_by_device(
    grads: list[Tensor],
    params: list[Tensor],
    anchors: list[Tensor],
    omegas: list[Tensor],
    lam: float,
    backend: str = "auto",
    device: torch.device | str | None = None,
) -> Tensor:
    """``grad += 2λ Ω (θ − θ*)`` for every tensor, on whatever device each lives; returns ``λ Σ Ω (θ − θ*)²``.

    Each tensor's grad, θ* and Ω must be on its θ's device (checked by the op). One
    ``mas_local::penalty_grad_`` call per device; the per-device values (0-d fp32)
    are added in float64 on ``device`` (default: the device of ``params[0]``) in the
    order the devices first appear, and returned as a 0-d float32 tensor there. With
    a single device this is exactly the plain op (same value, bit for bit).
    """
    n = len(params)
    if not (len(grads) == len(anchors) == len(omegas) == n):
        raise ValueError("penalty_grad_by_device: grads, params, anchors and omegas must have the same length")
    target = torch.device(device) if device is not None else (params[0].device if n else torch.device("cpu"))
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=target)
    op = torch.ops.mas_local.penalty_grad_
    values = []
    for idx in group_by_device(params).values():
        g, p, a, o = ([ts[i] for i in idx] for ts in (grads, params, anchors, omegas))
        values.append(op(g, p, a, o, lam, backend))
    if len(values) == 1 and values[0].device == target:
        return values[0]
    total = torch.zeros((), dtype=torch.float64, device=target)
    for v in values:
        total = total + v.to(device=target, dtype=torch.float64)
    return total.float()
