"""Torch reference implementations of the library's ops.

These are the readable specification, the CPU fallback, and the test oracle for
the Triton and C++/CUDA backends. Each function has the same signature as the
public op in :mod:`mas_local.ops` minus the ``backend`` argument.
Ω is always float32; operands may be any floating dtype and are upcast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def abs_gemm_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * |a|ᵀ |b|`` with a ``[R, out]``, b ``[R, in]``, omega ``[out, in]`` fp32.

    The reference always computes in exact fp32, whatever ``precision`` asks for.
    """
    omega.addmm_(a.float().abs().t(), b.float().abs(), alpha=alpha)


def per_sample_abs_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """``omega += alpha * Σ_b |a_bᵀ b_b|`` with a ``[B, T, out]``, b ``[B, T, in]``.

    Materialises ``[B, out, in]``; callers bound memory by splitting the batch
    (see ``mas_local.importance``), which is what the fused kernels avoid.
    """
    per_sample = torch.bmm(a.float().transpose(1, 2), b.float())
    omega.add_(per_sample.abs_().sum(0), alpha=alpha)


def penalty_grad_(
    grads: list[Tensor], params: list[Tensor], anchors: list[Tensor], omegas: list[Tensor], lam: float
) -> Tensor:
    """``grad += 2λ Ω (θ − θ*)`` for every tensor; returns ``λ Σ Ω (θ − θ*)²`` as a 0-d fp32 tensor.

    The value is summed in float64 tensor by tensor, in list order, so it is
    deterministic for given inputs.
    """
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g, p, a, o in zip(grads, params, anchors, omegas):
        diff = p.detach().float() - a.float()
        weighted = o.float() * diff
        g.add_((2.0 * lam * weighted).to(g.dtype))
        total += (weighted * diff).sum(dtype=torch.float64)
    return (total * lam).float()
