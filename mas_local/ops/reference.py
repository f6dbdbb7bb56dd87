"""Torch reference implementations of the library's ops.

These are the readable specification, the CPU fallback, and the test oracle for
the Triton and C++/CUDA backends. Each function has the same signature as the
public op in :mod:`mas_local.ops` minus the ``backend`` argument.
Ω is float32, or float64 for a float64 model (then everything runs in float64); operands may
be any floating dtype and are upcast.

``precision`` (``docs/triton.md`` states the contract): ``"exact"`` computes in
float64 and rounds into Ω, so no TF32 or reduced-precision setting of torch can
touch it; ``"accurate"`` and ``"fast"`` compute in float32 under torch's own matmul
settings (IEEE on the CPU by default; TF32 on a GPU only if the user allowed it,
which is within the ``"accurate"`` bound).
"""

from __future__ import annotations

import torch
from torch import Tensor


def abs_gemm_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * |a|ᵀ |b|`` with a ``[R, out]``, b ``[R, in]``, omega ``[out, in]`` fp32."""
    if precision == "exact" or omega.dtype == torch.float64:
        omega.add_((a.double().abs().t() @ b.double().abs()).mul_(alpha).to(omega.dtype))
        return
    omega.addmm_(a.float().abs().t(), b.float().abs(), alpha=alpha)


def per_sample_abs_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * Σ_b |a_bᵀ b_b|`` with a ``[B, T, out]``, b ``[B, T, in]``.

    Materialises ``[B, out, in]`` (in float32; ``"exact"`` takes float64 products
    half a batch at a time, so no more memory); callers bound memory by splitting
    the batch (see ``mas_local.importance``), which is what the fused kernels avoid.
    """
    if precision == "exact" or omega.dtype == torch.float64:
        total = torch.zeros(omega.shape, dtype=torch.float64, device=omega.device)
        step = max(1, a.shape[0] // 2)
        for s in range(0, a.shape[0], step):
            total += torch.bmm(a[s : s + step].double().transpose(1, 2), b[s : s + step].double()).abs_().sum(0)
        omega.add_(total.mul_(alpha).to(omega.dtype))
        return
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
        # in the parameter's dtype when it is wider than float32: a float64 θ − θ* of 1e-9 survives
        wide = torch.float64 if p.dtype == torch.float64 else torch.float32
        diff = p.detach().to(wide) - a.to(wide)
        weighted = o.to(wide) * diff
        g.add_((2.0 * lam * weighted).to(g.dtype))
        total += (weighted * diff).sum(dtype=torch.float64)
    return (total * lam).float()
