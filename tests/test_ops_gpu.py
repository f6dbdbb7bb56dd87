"""GPU readiness of the ops on every backend: the tensors' device and stream, channels_last
tensors, torch's TF32 settings in any API mix, CUDA-graph capture, 64-bit offsets, and which
cuBLAS call accumulates 16-bit operands. All tests need CUDA (marked ``cuda``; skipped without).

Tolerances: errors are bounded against α Σ|a·b| per element (``docs/triton.md``): 1e-5 for
``"exact"`` fp32, 2⁻⁹ for ``"accurate"`` fp32 (TF32), 1e-4 for 16-bit operands; the penalty
value rtol 1e-5 and grads rtol 1e-5 (fp32) against the float64-summed reference.
"""

from __future__ import annotations

import pytest
import torch

from mas_local import ops
from mas_local.ops import backend as mbackend
from mas_local.ops import reference

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BACKENDS = ["torch", "triton", "ext"]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")


def _need(backend, device="cuda"):
    reason = mbackend.unavailable_reason(backend, device)
    if reason is not None:
        pytest.skip(f"backend {backend} unavailable on {device}: {reason}")


def _randn(*shape, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def _within(got, want, bound, tol):
    err = (got.double() - want.double()).abs()
    limit = tol * bound + 1e-6 * bound.max()
    worst = (err / limit.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds {tol:.3g}·Σ|a·b| (worst ratio {worst:.3g})"


def _run_all_ops(backend, device, seed=0, precision="exact"):
    """abs-GEMM, per-sample and penalty on ``device``, each checked against the exact reference."""
    a, b = _randn(70, 33, device=device, seed=seed), _randn(70, 21, device=device, seed=seed + 1)
    omega = torch.rand(33, 21, device=device) + 0.5
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.5, "exact")
    ops.abs_gemm_acc_(omega, a, b, 0.5, backend=backend, precision=precision)
    _within(omega, want, 0.5 * a.double().abs().t() @ b.double().abs(), 1e-5)
    a3, b3 = _randn(3, 40, 33, device=device, seed=seed + 2), _randn(3, 40, 21, device=device, seed=seed + 3)
    omega = torch.rand(33, 21, device=device) + 0.5
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a3, b3, 0.5, "exact")
    ops.per_sample_abs_acc_(omega, a3, b3, 0.5, backend=backend, precision=precision)
    _within(omega, want, 0.5 * a3.reshape(-1, 33).double().abs().t() @ b3.reshape(-1, 21).double().abs(), 1e-5)
    shapes = [(1000,), (17, 9)]
    params = [_randn(*s, device=device, seed=seed + 10 + i) for i, s in enumerate(shapes)]
    anchors = [_randn(*s, device=device, seed=seed + 20 + i) for i, s in enumerate(shapes)]
    omegas = [torch.rand(s, device=device) for s in shapes]
    grads = [_randn(*s, device=device, seed=seed + 30 + i) for i, s in enumerate(shapes)]
    g_ref = [g.clone() for g in grads]
    want = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.7)
    got = ops.penalty_grad_(grads, params, anchors, omegas, 0.7, backend=backend)
    assert got.device == torch.device(device)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- device and stream


@TWO_GPUS
@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_on_the_tensors_gpu_not_the_current_one(backend):
    _need(backend, "cuda:1")
    torch.cuda.set_device(0)
    _run_all_ops(backend, "cuda:1")
    assert torch.cuda.current_device() == 0  # the guard restores the caller's device


@TWO_GPUS
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_by_device_over_two_gpus(backend):
    _need(backend, "cuda:0")
    _need(backend, "cuda:1")
    devices = ["cuda:0", "cuda:1", "cuda:0"]
    params = [_randn(500 + i, device=d, seed=i) for i, d in enumerate(devices)]
    anchors = [_randn(500 + i, device=d, seed=10 + i) for i, d in enumerate(devices)]
    omegas = [torch.rand(500 + i, device=d) for i, d in enumerate(devices)]
    grads = [_randn(500 + i, device=d, seed=20 + i) for i, d in enumerate(devices)]
    g_ref = [g.cpu() for g in grads]
    want = reference.penalty_grad_(
        g_ref, [p.cpu() for p in params], [a.cpu() for a in anchors], [o.cpu() for o in omegas], 0.3
    )
    got = ops.penalty_grad_by_device(grads, params, anchors, omegas, 0.3, backend=backend)
    assert got.device == torch.device("cuda:0")
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, g_ref):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_run_on_the_current_non_default_stream(backend):
    """Inputs are written on a side stream behind a long sleep: an op that launched on another stream would
    read them before they are written."""
    _need(backend)
    a_src, b_src = _randn(300, 64, device="cuda", seed=1), _randn(300, 48, device="cuda", seed=2)
    a, b = torch.empty_like(a_src), torch.empty_like(b_src)
    omega = torch.ones(64, 48, device="cuda")
    p_src = _randn(4096, device="cuda", seed=3)
    p, anchor, grad = torch.empty_like(p_src), torch.zeros(4096, device="cuda"), torch.zeros(4096, device="cuda")
    om = torch.rand(4096, device="cuda")
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time on this stream
        a.copy_(a_src)
        b.copy_(b_src)
        p.copy_(p_src)
        ops.abs_gemm_acc_(omega, a, b, 1.0, backend=backend, precision="exact")
        value = ops.penalty_grad_([grad], [p], [anchor], [om], 1.0, backend=backend)
    side.synchronize()
    want = torch.ones(64, 48, device="cuda")
    reference.abs_gemm_acc_(want, a_src, b_src, 1.0, "exact")
    _within(omega, want, a_src.double().abs().t() @ b_src.double().abs(), 1e-5)
    torch.testing.assert_close(grad, 2.0 * om * p_src, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(value, (om * p_src * p_src).sum(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("omega_format", [torch.channels_last, torch.contiguous_format])
@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_on_channels_last_parameters(backend, omega_format):
    """A channels_last conv model: grads updated in place in their layout, Ω in either layout."""
    _need(backend)
    conv = torch.nn.Conv2d(8, 16, 3).cuda().to(memory_format=torch.channels_last)
    params = [p.detach() for p in conv.parameters()]
    anchors = [p.clone() + 0.1 * torch.randn_like(p) for p in params]
    omegas = [
        torch.rand_like(p).contiguous(memory_format=omega_format) if p.dim() == 4 else torch.rand_like(p)
        for p in params
    ]
    grads = [torch.randn_like(p) for p in params]
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    ptrs = [g.data_ptr() for g in grads]
    g_ref = [g.clone() for g in grads]
    want = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.9)
    got = ops.penalty_grad_(grads, params, anchors, omegas, 0.9, backend=backend)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, r, ptr in zip(grads, g_ref, ptrs):
        assert g.data_ptr() == ptr
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- TF32 settings


@pytest.fixture
def tf32_everywhere():
    """The user enabled TF32 through both APIs (the new one, then the legacy flag); restored after, legacy first,
    so that the two agree again (torch raises on reading a legacy flag that disagrees with the new API)."""
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    if new_api:
        matmul.fp32_precision = "tf32"
    matmul.allow_tf32 = True
    yield
    if new_api:
        matmul.allow_tf32 = before == "tf32"
        matmul.fp32_precision = before
    else:
        matmul.allow_tf32 = before


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_stays_exact_when_the_user_enabled_tf32(tf32_everywhere, backend):
    """ "exact" must not become TF32 (≈1e-3 per product) whatever the global flags say; the ops must not
    trip over the flags either."""
    _need(backend)
    _run_all_ops(backend, "cuda", seed=5, precision="exact")


# --------------------------------------------------------------------------- CUDA graphs


def test_triton_penalty_in_a_cuda_graph():
    _need("triton")
    shapes = [(70_001,), (300, 7), (5,)]
    params = [_randn(*s, device="cuda", seed=i) for i, s in enumerate(shapes)]
    anchors = [_randn(*s, device="cuda", seed=10 + i) for i, s in enumerate(shapes)]
    omegas = [torch.rand(s, device="cuda") for s in shapes]
    grads = [torch.zeros(s, device="cuda") for s in shapes]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up puts the chunk tables on the device
        ops.penalty_grad_(grads, params, anchors, omegas, 0.5, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        value = ops.penalty_grad_(grads, params, anchors, omegas, 0.5, backend="triton")
    for step in range(2):
        with torch.no_grad():
            for g, p in zip(grads, params):
                g.zero_()
                p.add_(0.1 * (step + 1))
        graph.replay()
        torch.cuda.synchronize()
        g_ref = [torch.zeros_like(g) for g in grads]
        want = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.5)
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6)
        for x, y in zip(grads, g_ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_triton_penalty_capture_without_warm_up_is_refused_clearly():
    _need("triton")
    params, anchors = [_randn(1234, device="cuda", seed=40)], [_randn(1234, device="cuda", seed=41)]
    omegas, grads = [torch.rand(1234, device="cuda")], [torch.zeros(1234, device="cuda")]
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA-graph capture"), torch.cuda.graph(graph):
        ops.penalty_grad_(grads, params, anchors, omegas, 0.5, backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_gemm_ops_in_a_cuda_graph(dtype):
    _need("triton")
    a, b = _randn(200, 64, device="cuda", dtype=dtype, seed=50), _randn(200, 40, device="cuda", dtype=dtype, seed=51)
    a3, b3 = a.reshape(4, 50, 64), b.reshape(4, 50, 40)
    omega = torch.zeros(64, 40, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, checks the cuBLAS path once
        ops.abs_gemm_acc_(omega, a, b, 1.0, backend="triton")
        ops.per_sample_abs_acc_(omega, a3, b3, 1.0, backend="triton")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.abs_gemm_acc_(omega, a, b, 1.0, backend="triton")
        ops.per_sample_abs_acc_(omega, a3, b3, 1.0, backend="triton")
    omega.zero_()
    graph.replay()
    torch.cuda.synchronize()
    want = torch.zeros(64, 40, device="cuda")
    reference.abs_gemm_acc_(want, a, b, 1.0, "exact")
    reference.per_sample_abs_acc_(want, a3, b3, 1.0, "exact")
    bound = 2 * a.double().abs().t() @ b.double().abs()
    _within(omega, want, bound, 1e-4 if dtype != torch.float32 else 2.0**-9)


# --------------------------------------------------------------------------- 64-bit offsets and cuBLAS path


@pytest.mark.parametrize("backend", ["triton", "ext"])
def test_per_sample_offsets_past_2_pow_31(backend):
    """A [1, T, 16] operand whose sequence stride puts k·stride past 2³¹ elements (32-bit offsets wrapped)."""
    _need(backend)
    seq, stride = (1 << 15) + 64, 1 << 16  # last rows start past 2³¹ elements
    base = torch.empty(seq * stride, dtype=torch.bfloat16, device="cuda")  # 4 GiB, only seq·16 used
    a = base.as_strided((1, seq, 16), (seq * stride, stride, 1))
    a.copy_(_randn(1, seq, 16, device="cuda", dtype=torch.bfloat16, seed=60))
    b = _randn(1, seq, 16, device="cuda", dtype=torch.bfloat16, seed=61)
    omega = torch.zeros(16, 16, device="cuda")
    ops.per_sample_abs_acc_(omega, a, b, 1.0, backend=backend)
    a_c = a.contiguous()
    want = torch.zeros(16, 16, device="cuda")
    reference.per_sample_abs_acc_(want, a_c, b, 1.0, "exact")
    _within(omega, want, a_c[0].double().abs().t() @ b[0].double().abs(), 1e-4)
    del base


def test_triton_16bit_abs_gemm_accumulates_in_cublas():
    """Which call the Triton backend uses after its abs pre-pass for 16-bit operands on this GPU/torch."""
    _need("triton")
    from mas_local.kernels import abs_gemm

    paths = {dtype: abs_gemm.cublas_path(torch.device("cuda"), dtype) for dtype in (torch.bfloat16, torch.float16)}
    print("cuBLAS paths:", paths)
    assert all(p in ("addmm.dtype_out", "mm.out_dtype") for p in paths.values()), paths


def test_fp8_fast_path_nan_and_scratch_chunks(monkeypatch):
    """fp8 "fast": a NaN operand gives NaN Ω (not a finite wrong one), and R-chunks bound the fp8 scratch."""
    _need("triton")
    from mas_local.kernels import abs_gemm, fp8

    if fp8.unavailable_reason(torch.device("cuda")) is not None:
        pytest.skip(f"no fp8: {fp8.unavailable_reason(torch.device('cuda'))}")
    a, b = (
        _randn(4096, 256, device="cuda", dtype=torch.bfloat16, seed=70),
        _randn(4096, 128, device="cuda", dtype=torch.bfloat16, seed=71),
    )
    monkeypatch.setattr(abs_gemm, "SCRATCH_BYTES", 1024 * (256 + 128))  # 1024-row chunks
    omega = torch.rand(256, 128, device="cuda") + 0.5
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / 4096, "exact")
    got = omega.clone()
    abs_gemm.abs_gemm_acc_(got, a, b, 1.0 / 4096, "fast")
    assert ((got - want).norm() / (want - omega).norm()).item() <= 1e-2
    b[3000, 5] = float("nan")
    abs_gemm.abs_gemm_acc_(got, a, b, 1.0 / 4096, "fast")
    assert torch.isnan(got).all()
