"""End to end on a CUDA GPU: estimators and the penalty through every backend, against the CPU reference.

These run in bench/gpu_check.sh on the GPU machine and skip elsewhere. The models
are float32 on the GPU; the CPU float64 run of the same model is the oracle. torch's
own TF32 (cuDNN convolutions, cuBLAS matmuls in the models' forward and backward) is
switched off for these tests, through the new ``fp32_precision`` API where torch has
it, so the only rounding left is the ops' own, asked for as ``precision="exact"``.
Tolerance: rel 2e-3 of max|Ω| per parameter (fp32 forward/backward against float64;
also covers an estimator path that does not yet pass ``precision`` to every op and
so runs "accurate", whose TF32 error is ≤ 2⁻⁹ of Σ|a·b|).
"""

from __future__ import annotations

import copy

import pytest
import torch

import mas_local as ml
from mas_local import backend as bk
from tests.models import ConvNet, TokenModel

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """No TF32 in torch's own convolutions and matmuls during these oracle tests (restored after)."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision") and hasattr(getattr(conv, "conv", None), "fp32_precision"):
        before = (matmul.fp32_precision, conv.conv.fp32_precision)
        matmul.fp32_precision, conv.conv.fp32_precision = "ieee", "ieee"
        yield
        matmul.fp32_precision, conv.conv.fp32_precision = before
    else:  # torch without the new API: the legacy flags are the only ones
        before = (matmul.allow_tf32, conv.allow_tf32)
        matmul.allow_tf32, conv.allow_tf32 = False, False
        yield
        matmul.allow_tf32, conv.allow_tf32 = before


BACKENDS = ["torch", "triton", "ext"]


def _backend_or_skip(name):
    reason = bk.unavailable_reason(name, "cuda")
    if reason is not None:
        pytest.skip(f"backend {name} unavailable on cuda: {reason}")


def _pair(factory, data_fn):
    torch.manual_seed(0)
    cpu = factory().double().eval()
    gpu = copy.deepcopy(cpu).float().cuda()
    data = data_fn()
    return cpu, gpu, data


def _conv_data():
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(6, 3, 9, 7, generator=g, dtype=torch.float64),
        torch.randn(5, 3, 9, 7, generator=g, dtype=torch.float64),
    ]


def _token_data():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 17, (6, 5), generator=g), torch.randint(0, 17, (5, 5), generator=g)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode, estimator", [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample")]
)
@pytest.mark.parametrize("kind", ["conv", "tokens"])
def test_importance_on_gpu_matches_cpu(kind, mode, estimator, backend):
    _backend_or_skip(backend)
    factory, data_fn = (ConvNet, _conv_data) if kind == "conv" else (TokenModel, _token_data)
    cpu, gpu, data = _pair(factory, data_fn)
    want = ml.compute_importance(cpu, data, mode=mode, estimator=estimator, backend="torch", progress=False)
    gpu_data = [(d.float() if d.is_floating_point() else d).cuda() for d in data]
    got = ml.compute_importance(
        gpu, gpu_data, mode=mode, estimator=estimator, backend=backend, progress=False, precision="exact"
    )
    for name, w in want.items():
        g = got[name]
        assert g.device.type == "cuda" and g.dtype == torch.float32
        scale = w.abs().max().item()
        torch.testing.assert_close(g.cpu(), w, rtol=2e-3, atol=2e-3 * scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_penalty_on_gpu_matches_autograd(backend):
    _backend_or_skip(backend)
    cpu, gpu, data = _pair(TokenModel, _token_data)
    mas = ml.MAS(gpu, lam=0.8, backend=backend, progress=False)
    mas.consolidate([d.cuda() for d in data])
    with torch.no_grad():
        for p in gpu.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pen = mas.penalty()
    want = torch.autograd.grad(pen, list(gpu.parameters()))
    for p in gpu.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in gpu.parameters()]
    value = mas.add_penalty_grad_()
    torch.testing.assert_close(value, pen.detach(), rtol=1e-5, atol=1e-8)
    for p, b, w in zip(gpu.parameters(), before, want):
        torch.testing.assert_close(p.grad - b, w, rtol=1e-5, atol=1e-6)
    again = mas.add_penalty_grad_()
    assert torch.equal(again, value), "penalty value must be bit-identical across runs"


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_model_importance_and_fused_penalty(backend):
    """A channels_last conv model: Ω as on the contiguous model, and the fused penalty equals autograd's."""
    _backend_or_skip(backend)
    cpu, gpu, data = _pair(ConvNet, _conv_data)
    gpu = gpu.to(memory_format=torch.channels_last)
    gpu_data = [d.float().cuda().contiguous(memory_format=torch.channels_last) for d in data]
    want = ml.compute_importance(cpu, data, mode="local", backend="torch", progress=False)
    got = ml.compute_importance(gpu, gpu_data, mode="local", backend=backend, progress=False, precision="exact")
    for name, w in want.items():
        scale = w.abs().max().item()
        torch.testing.assert_close(got[name].cpu(), w, rtol=2e-3, atol=2e-3 * scale, msg=name)
    mas = ml.MAS(gpu, lam=0.6, mode="local", backend=backend, progress=False)
    mas.consolidate(gpu_data)
    with torch.no_grad():
        for p in gpu.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pen = mas.penalty()
    want_g = torch.autograd.grad(pen, list(gpu.parameters()))
    for p in gpu.parameters():
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in gpu.parameters()]
    value = mas.add_penalty_grad_()
    torch.testing.assert_close(value, pen.detach(), rtol=1e-5, atol=1e-8)
    for p, b, w in zip(gpu.parameters(), before, want_g):
        torch.testing.assert_close(p.grad - b, w, rtol=1e-5, atol=1e-6)


def test_compare_command_runs_on_cuda(tmp_path):
    from mas_local.cli import main

    code = main(
        [
            "compare",
            "--device",
            "cuda",
            "--seeds",
            "1",
            "--tasks",
            "2",
            "--epochs",
            "1",
            "--lam-grid",
            "0.1,1",
            "--quiet",
            "--no-plots",
            "--out",
            str(tmp_path),
        ]
    )
    assert code in (0, None)
    assert (tmp_path / "results.json").exists()
