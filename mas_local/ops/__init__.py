"""The library's ops, each declared once as a ``torch.library`` custom op.

``mas_local::abs_gemm_acc_``       Ω += α · |A|ᵀ|B|                 (hebbian Linear, global sample on 2-D input)
``mas_local::per_sample_abs_acc_`` Ω += α · Σ_b |A_bᵀ B_b|          (sample estimators on sequences and convolutions)
``mas_local::penalty_grad_``       grad += 2λΩ(θ−θ*), returns λΣΩ(θ−θ*)²   (the fused penalty)

Each op validates its arguments, then runs the implementation that
:func:`mas_local.ops.backend.resolve` picks for the device and the ``backend``
argument. Fake kernels let ``torch.compile`` trace through them.

``precision`` (both GEMM-shaped ops) has one meaning for every backend: an error
bound relative to ``Σ|a·b|`` (the sum of the absolute products, since ``Σ_t a·b`` can
cancel), stated with what each backend runs in ``docs/triton.md``:
``"exact"`` no reduced-precision operands (fp32 without TF32 in the kernels, float64 in
the torch reference), ``"accurate"`` (default) fp32 operands may be rounded to TF32,
``"fast"`` operands may be rounded to bf16, or to fp8 e4m3 with per-tensor scales where
a backend has it. A backend that runs something other than
what was asked (e.g. no fp8) logs it once.

Parameters spread over several devices: :func:`penalty_grad_by_device`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .backend import resolve

log = logging.getLogger("mas_local")

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
PRECISIONS = ("accurate", "exact", "fast")
__all__ = [
    "PRECISIONS",
    "abs_gemm_acc_",
    "check_penalty_args",
    "group_by_device",
    "penalty_grad_",
    "penalty_grad_by_device",
    "per_sample_abs_acc_",
]


def _check_omega(omega: Tensor, shape: tuple[int, ...], what: str) -> None:
    if omega.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{what}: omega must be float32 (or float64 for a float64 model), got {omega.dtype}")
    if tuple(omega.shape) != shape:
        raise ValueError(f"{what}: omega has shape {tuple(omega.shape)}, expected {shape}")


_float64_noticed: set = set()


def _backend_for(omega: Tensor, backend: str, what: str) -> str:
    """A float64 Ω (a float64 model's) runs on the torch reference, in float64: the kernels are float32. A forced
    kernel backend is then not what runs, which is logged once (as for any backend that runs something else)."""
    if omega.dtype != torch.float64:
        return backend
    if backend not in ("auto", "torch") and backend not in _float64_noticed:
        _float64_noticed.add(backend)
        log.info("mas_local: %s: backend %r has no float64 path; a float64 omega runs on 'torch'", what, backend)
    return "torch"


def _check_operands(what: str, omega: Tensor, *operands: Tensor) -> None:
    for t in operands:
        if t.dtype not in _FLOATS:
            raise TypeError(f"{what}: operands must be floating point, got {t.dtype}")
        if t.device != omega.device:
            raise ValueError(f"{what}: operand on {t.device} but omega on {omega.device}")


def _check_precision(what: str, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"{what}: precision must be one of {PRECISIONS}, got {precision!r}")


def _abs_gemm_acc(
    omega: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, backend: str = "auto", precision: str = "accurate"
) -> None:
    """``omega[out, in] += alpha * |a|ᵀ |b|`` for a ``[R, out]``, b ``[R, in]``; omega float32 (float64: the
    torch reference runs, in float64).

    ``precision``: ``"exact"``, ``"accurate"`` or ``"fast"`` (see the module docstring).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"abs_gemm_acc_: expected a [R, out] and b [R, in], got {tuple(a.shape)} and {tuple(b.shape)}")
    _check_omega(omega, (a.shape[1], b.shape[1]), "abs_gemm_acc_")
    _check_operands("abs_gemm_acc_", omega, a, b)
    _check_precision("abs_gemm_acc_", precision)
    _, impl = resolve("abs_gemm_acc", omega.device, _backend_for(omega, backend, "abs_gemm_acc_"))
    impl(omega, a, b, alpha, precision)


abs_gemm_acc_ = torch.library.custom_op("mas_local::abs_gemm_acc_", mutates_args=("omega",))(_abs_gemm_acc)


@abs_gemm_acc_.register_fake
def _(omega, a, b, alpha=1.0, backend="auto", precision="accurate"):
    return None


def _per_sample_abs_acc(
    omega: Tensor, a: Tensor, b: Tensor, alpha: float = 1.0, backend: str = "auto", precision: str = "accurate"
) -> None:
    """``omega[out, in] += alpha * Σ_b |a_bᵀ b_b|`` for a ``[B, T, out]``, b ``[B, T, in]``; omega float32
    (float64: the torch reference runs, in float64).

    ``precision`` as for :func:`abs_gemm_acc_` (no backend has an fp8 path for this op).
    """
    if a.dim() != 3 or b.dim() != 3 or a.shape[:2] != b.shape[:2]:
        raise ValueError(
            f"per_sample_abs_acc_: expected a [B, T, out] and b [B, T, in], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    _check_omega(omega, (a.shape[2], b.shape[2]), "per_sample_abs_acc_")
    _check_operands("per_sample_abs_acc_", omega, a, b)
    _check_precision("per_sample_abs_acc_", precision)
    _, impl = resolve("per_sample_abs_acc", omega.device, _backend_for(omega, backend, "per_sample_abs_acc_"))
    impl(omega, a, b, alpha, precision)


per_sample_abs_acc_ = torch.library.custom_op("mas_local::per_sample_abs_acc_", mutates_args=("omega",))(
    _per_sample_abs_acc
)


class _Eager:
    """The same ops without the dispatcher hop, for eager callers that never trace (the importance pass).

    Call them under ``torch.no_grad()``: they do not record autograd history.
    """

    abs_gemm_acc_ = staticmethod(_abs_gemm_acc)
    per_sample_abs_acc_ = staticmethod(_per_sample_abs_acc)


eager = _Eager()


@per_sample_abs_acc_.register_fake
def _(omega, a, b, alpha=1.0, backend="auto", precision="accurate"):
    return None


def check_penalty_args(grads, params, anchors, omegas) -> None:
    """Validate the penalty's tensor lists: equal lengths, per-tensor shapes, one device, Ω dtype."""
    n = len(params)
    if not (len(grads) == len(anchors) == len(omegas) == n):
        raise ValueError("penalty_grad_: grads, params, anchors and omegas must have the same length")
    for i, (g, p, a, o) in enumerate(zip(grads, params, anchors, omegas)):
        if not (g.shape == p.shape == a.shape == o.shape):
            raise ValueError(
                f"penalty_grad_: tensor {i} has mismatched shapes grad {tuple(g.shape)}, param {tuple(p.shape)}, "
                f"anchor {tuple(a.shape)}, omega {tuple(o.shape)}"
            )
        if not (g.device == p.device == a.device == o.device):
            raise ValueError(
                f"penalty_grad_: grad, param, anchor and omega {i} are on different devices "
                f"({g.device}, {p.device}, {a.device}, {o.device})"
            )
        if p.device != params[0].device:
            raise ValueError(
                f"penalty_grad_: tensor {i} is on {p.device} but tensor 0 on {params[0].device}; one call serves "
                "one device: use mas_local.ops.penalty_grad_by_device for parameters on several devices"
            )
        if o.dtype not in (torch.float32, torch.bfloat16):
            raise TypeError(f"penalty_grad_: omega {i} must be float32 or bfloat16, got {o.dtype}")


@torch.library.custom_op("mas_local::penalty_grad_", mutates_args=("grads",))
def penalty_grad_(
    grads: list[Tensor],
    params: list[Tensor],
    anchors: list[Tensor],
    omegas: list[Tensor],
    lam: float,
    backend: str = "auto",
) -> Tensor:
    """``grad += 2λ Ω (θ − θ*)`` for each tensor; returns ``λ Σ Ω (θ − θ*)²`` (0-d float32).

    Ω may be float32 or bfloat16; θ* has θ's dtype; grads have θ's shape. θ − θ* is taken in float32, or in
    float64 for float64 parameters (then the torch reference runs: the kernels are float32).
    """
    check_penalty_args(grads, params, anchors, omegas)
    if not params:
        return torch.zeros((), dtype=torch.float32)
    if any(p.dtype == torch.float64 for p in params):  # the kernels compute θ − θ* in float32
        backend = _float64_penalty_backend(backend)
    _, impl = resolve("penalty_grad", params[0].device, backend)
    return impl(grads, params, anchors, omegas, lam)


def _float64_penalty_backend(backend: str) -> str:
    if backend not in ("auto", "torch") and ("penalty", backend) not in _float64_noticed:
        _float64_noticed.add(("penalty", backend))
        log.info("mas_local: penalty_grad_: backend %r has no float64 path; float64 parameters run on 'torch'", backend)
    return "torch"


@penalty_grad_.register_fake
def _(grads, params, anchors, omegas, lam, backend="auto"):
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((), dtype=torch.float32, device=device)


from .multi_device import group_by_device, penalty_grad_by_device  # noqa: E402  (uses the op declared above)
