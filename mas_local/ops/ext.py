"""Backend ``ext``: the compiled extension ``mas_local._C``.

Importing ``mas_local._C`` registers the ops ``mas_local_ext::abs_gemm_acc_``,
``mas_local_ext::per_sample_abs_acc_`` and ``mas_local_ext::penalty_grad_`` (CPU kernels
always, CUDA kernels when the extension was built with CUDA) and
``mas_local_ext::has_cuda``. This module adds their fake kernels, so ``torch.compile``
traces through them, and exposes the three functions with the reference
signatures (see :mod:`mas_local.ops.reference`) that :mod:`mas_local.ops.backend` calls.

Importing this module raises ``ImportError`` when the extension is not built;
the backend layer treats that as "ext absent".

Precision (``docs/extension.md``): the extension has no fp8 kernels, so ``"fast"``
runs bf16 operands on CUDA and plain fp32 on the CPU; each such substitution is
logged once. The CUDA penalty copies a chunk table from pinned host memory on every
call, so it refuses to run inside a CUDA-graph capture (use the Triton backend there).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .. import _C  # noqa: F401  (registers the mas_local_ext:: ops)
from . import reference as _reference

_ops = torch.ops.mas_local_ext
# Element types the compiled kernels handle; anything else (float64) is routed
# to the exact torch reference, which is what these kernels would compute anyway.
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.register_fake("mas_local_ext::abs_gemm_acc_")
def _abs_gemm_acc_fake(omega, a, b, alpha, precision):
    return None


@torch.library.register_fake("mas_local_ext::per_sample_abs_acc_")
def _per_sample_abs_acc_fake(omega, a, b, alpha, precision):
    return None


@torch.library.register_fake("mas_local_ext::penalty_grad_")
def _penalty_grad_fake(grads, params, anchors, omegas, lam):
    device = params[0].device if len(params) else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


def has_cuda() -> bool:
    """Whether this build of the extension registered its CUDA kernels."""
    return bool(_ops.has_cuda())


def supports(device: torch.device | str) -> str | None:
    """``None`` if the extension's kernels run on ``device``, else the reason why not."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not has_cuda():
            return "mas_local._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        return None
    return f"mas_local._C has no kernels for device type {device.type!r}"


log = logging.getLogger("mas_local")
_noticed: set[tuple] = set()


def _fast_notice(op: str, device: torch.device) -> None:
    """Log once per (op, device type) what ``precision="fast"`` runs in this backend instead of fp8."""
    key = (op, device.type)
    if key in _noticed:
        return
    _noticed.add(key)
    if device.type == "cuda":
        what = "fp32 operands are rounded to bf16 (tensor cores), 16-bit operands are used as given"
    else:
        what = "the CPU kernels compute in fp32 whatever the precision, as for 'exact'"
    log.warning(
        "mas_local: backend 'ext' has no fp8 kernels: %s precision='fast' on %s runs this instead: %s",
        op,
        device.type,
        what,
    )


def abs_gemm_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * |a|ᵀ |b|`` (see :func:`mas_local.ops.reference.abs_gemm_acc_`)."""
    if precision == "fast":
        _fast_notice("abs_gemm_acc_", omega.device)
    _ops.abs_gemm_acc_(omega, a.detach(), b.detach(), float(alpha), precision)


def per_sample_abs_acc_(omega: Tensor, a: Tensor, b: Tensor, alpha: float, precision: str = "accurate") -> None:
    """``omega += alpha * Σ_b |a_bᵀ b_b|`` (see :func:`mas_local.ops.reference.per_sample_abs_acc_`)."""
    if precision == "fast":
        _fast_notice("per_sample_abs_acc_", omega.device)
    _ops.per_sample_abs_acc_(omega, a.detach(), b.detach(), float(alpha), precision)


def refuse_capture(device: torch.device) -> None:
    """Raise a clear error when the CUDA penalty is called inside a CUDA-graph capture."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "penalty_grad_ (backend 'ext') cannot run inside a CUDA-graph capture: it copies its chunk table "
            "from pinned host memory on every call, which a replayed graph would read after it was recycled. "
            "Use backend='triton' (capture-safe after one warm-up call) or call it outside the graph."
        )


def penalty_grad_(
    grads: list[Tensor], params: list[Tensor], anchors: list[Tensor], omegas: list[Tensor], lam: float
) -> Tensor:
    """``grad += 2λΩ(θ−θ*)``; returns ``λΣΩ(θ−θ*)²`` (see :func:`mas_local.ops.reference.penalty_grad_`)."""
    if not params:
        return torch.zeros((), dtype=torch.float32)
    refuse_capture(params[0].device)
    if any(t.dtype not in _KERNEL_DTYPES for t in (*grads, *params)) or any(
        a.dtype != p.dtype for a, p in zip(anchors, params)
    ):
        return _reference.penalty_grad_(grads, params, anchors, omegas, lam)
    return _ops.penalty_grad_(
        list(grads),
        [p.detach() for p in params],
        [a.detach() for a in anchors],
        [o.detach() for o in omegas],
        float(lam),
    )
