"""The ``precision`` argument of the GEMM-shaped ops: validated once, handed to every backend,
and never implemented by touching torch's global TF32 flags (which, on torch ≥ 2.9, raise when
read after the new ``fp32_precision`` API was used, and are not thread-safe anyway).

Tolerances: the reference's ``"exact"`` mode computes in float64 and rounds into the fp32 Ω
(twice: product, then sum), so it is compared with a float64 computation at rtol 3e-7.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from mas_local import ops
from mas_local.ops import backend, reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = [
    (
        "abs_gemm_acc_",
        lambda p, **kw: ops.abs_gemm_acc_(
            torch.rand(3, 4), torch.randn(5, 3), torch.randn(5, 4), 1.0, precision=p, **kw
        ),
    ),
    (
        "per_sample_abs_acc_",
        lambda p, **kw: ops.per_sample_abs_acc_(
            torch.rand(3, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4), 1.0, precision=p, **kw
        ),
    ),
]


def test_reference_exact_is_computed_in_float64():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 17, generator=g), torch.randn(300, 13, generator=g)
    omega = torch.rand(17, 13, generator=g)
    want = (omega.double() + 0.3 * a.double().abs().t() @ b.double().abs()).float()
    got = omega.clone()
    reference.abs_gemm_acc_(got, a, b, 0.3, "exact")
    torch.testing.assert_close(got, want, rtol=3e-7, atol=0)
    a3, b3 = torch.randn(5, 40, 17, generator=g), torch.randn(5, 40, 13, generator=g)
    want = (omega.double() + 0.3 * torch.bmm(a3.double().transpose(1, 2), b3.double()).abs().sum(0)).float()
    got = omega.clone()
    reference.per_sample_abs_acc_(got, a3, b3, 0.3, "exact")
    torch.testing.assert_close(got, want, rtol=3e-7, atol=0)


@pytest.mark.parametrize("name,call", OPS)
def test_unknown_precision_is_rejected_with_the_choices(name, call):
    with pytest.raises(ValueError, match=rf"{name}: precision must be one of .*'exact'"):
        call("tf32")


@pytest.mark.parametrize("precision", [None, "exact", "accurate", "fast"])
@pytest.mark.parametrize("name,call", OPS)
def test_precision_reaches_the_backend(monkeypatch, name, call, precision):
    seen = []

    def recorder(omega, a, b, alpha, precision):
        seen.append(precision)

    monkeypatch.setattr(ops, "resolve", lambda op, device, backend="auto": ("recorder", recorder))
    if precision is None:
        kw_call = {
            "abs_gemm_acc_": lambda: ops.abs_gemm_acc_(torch.rand(3, 4), torch.randn(5, 3), torch.randn(5, 4)),
            "per_sample_abs_acc_": lambda: ops.per_sample_abs_acc_(
                torch.rand(3, 4), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
            ),
        }[name]
        kw_call()
        assert seen == ["accurate"]  # the default
    else:
        call(precision)
        assert seen == [precision]


@pytest.fixture
def new_tf32_api():
    """Set cuBLAS fp32 precision through the new API (as a user of torch ≥ 2.9 may), restore it after."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision API")
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    yield matmul
    matmul.fp32_precision = before


@pytest.mark.parametrize("precision", ["exact", "accurate", "fast"])
def test_ops_leave_the_tf32_settings_alone(new_tf32_api, precision):
    for name in backend.available_backends("cpu"):
        if name == "triton":  # interpreted kernels: covered by tests/test_triton_kernels.py
            continue
        for _, call in OPS:
            call(precision, backend=name)
        grads = [torch.randn(6)]
        ops.penalty_grad_(grads, [torch.randn(6)], [torch.randn(6)], [torch.rand(6)], 0.5, backend=name)
    assert new_tf32_api.fp32_precision == "tf32"


def test_no_library_code_reads_or_writes_the_legacy_tf32_flags():
    """The legacy ``allow_tf32`` flags are global (not thread-safe) and raise once the new API was used:
    precision is chosen per launch instead (Triton input_precision, the extension's own kernels)."""
    offenders = []
    for folder in ("kernels", "mas_local/ops", "csrc"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".cpp", ".cu", ".cuh", ".h") and "allow_tf32" in path.read_text():
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
