"""The compiled extension (backend "ext") against the torch reference.

Tolerances (the reference computes in fp32 after upcasting, the value in float64):
  abs-GEMM, CPU:        rtol 1e-5, atol 1e-5 — the same fp32 GEMM after a one-pass abs-cast.
  per-sample, CPU:      rtol 1e-5, atol 1e-4 — fp32 batched GEMM per slice, |·| summed in fp32.
  penalty value, CPU:   rtol 1e-5 — float partials per 512 elements, double above that.
  penalty grads:        fp32 rtol 1e-6 / atol 1e-6; bf16 and fp16 grads one rounding of the
                        grad dtype (rtol 2**-7 resp. 2**-10), because the kernel rounds
                        g + 2λw once where the reference rounds 2λw and then the sum.
  CUDA (errors bounded against α Σ|a·b|, the precision contract of docs/extension.md):
  "exact" 1e-5 (fp32 FMA kernels, or 16-bit operands as given: exact products, fp32
  accumulation — 1e-4 on tensor cores); "accurate" fp32 (TF32, ≤ 2⁻¹⁰ per operand) 2⁻⁹;
  "fast" (bf16, ≤ 2⁻⁸ per operand) 2⁻⁷; penalty as on the CPU.
Tests that need the built extension skip with a reason when ``mas_local._C`` is missing;
the public-op opcheck tests always run (torch backend, plus ext when built).
"""

from __future__ import annotations

import pytest
import torch

from mas_local import ops
from mas_local.ops import reference

try:
    from mas_local.ops import ext as _ext

    HAVE_EXT = True
    EXT_REASON = ""
except ImportError as exc:  # not built (MAS_LOCAL_NO_EXT=1, or no compiler)
    _ext = None
    HAVE_EXT = False
    EXT_REASON = f"mas_local._C is not built ({exc})"

needs_ext = pytest.mark.skipif(not HAVE_EXT, reason=EXT_REASON or "mas_local._C is not built")
HAVE_CUDA_EXT = HAVE_EXT and torch.cuda.is_available() and _ext.has_cuda()
if not torch.cuda.is_available():
    CUDA_REASON = "no CUDA device"
elif not HAVE_EXT:
    CUDA_REASON = EXT_REASON
else:
    CUDA_REASON = "mas_local._C was built without CUDA kernels"
needs_cuda_ext = pytest.mark.skipif(not HAVE_CUDA_EXT, reason=CUDA_REASON)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GRAD_RTOL = {torch.float32: 1e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
GRAD_ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}
PUBLIC_BACKENDS = ["torch"] + (["ext"] if HAVE_EXT else [])


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g, device="cpu"):
    return torch.randn(shape, generator=g).to(dtype=dtype, device=device)


def _omega(shape, g, dtype=torch.float32, device="cpu"):
    # strictly positive, never zero: a pre-filled Ω from earlier tasks
    return (torch.rand(shape, generator=g) + 0.1).to(dtype=dtype, device=device)


def _penalty_inputs(shapes, pdtype, odtype, gdtype, seed, device="cpu"):
    g = _gen(seed)
    params = [_randn(s, pdtype, g, device) for s in shapes]
    anchors = [_randn(s, pdtype, g, device) for s in shapes]
    omegas = [_omega(s, g, odtype, device) for s in shapes]
    grads = [_randn(s, gdtype, g, device) for s in shapes]
    return grads, params, anchors, omegas


PENALTY_SHAPES = [(3, 5), (70_001,), (1,), (0,), (129, 257), (7, 1, 3)]


def _check_penalty(impl, shapes, pdtype, odtype, gdtype, device="cpu", lam=0.7, seed=0):
    grads, params, anchors, omegas = _penalty_inputs(shapes, pdtype, odtype, gdtype, seed, device)
    g_ref = [x.clone() for x in grads]
    value = impl(grads, params, anchors, omegas, lam)
    expected = reference.penalty_grad_(g_ref, params, anchors, omegas, lam)
    assert value.dtype == torch.float32 and value.dim() == 0 and value.device == params[0].device
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, g_ref):
        torch.testing.assert_close(got, want, rtol=GRAD_RTOL[gdtype], atol=GRAD_ATOL[gdtype])


# ---------------------------------------------------------------------------
# CPU kernels


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 13, 29), (200, 65, 33)])
def test_abs_gemm_cpu(dtype, shape):
    r, out, inn = shape
    g = _gen(1)
    a, b = _randn((r, out), dtype, g), _randn((r, inn), dtype, g)
    omega = _omega((out, inn), g)
    want = omega.clone()
    _ext.abs_gemm_acc_(omega, a, b, 0.37)
    reference.abs_gemm_acc_(want, a, b, 0.37)
    torch.testing.assert_close(omega, want, rtol=1e-5, atol=1e-5)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 7, 13, 29), (9, 5, 130, 300), (3, 17, 1, 40)])
def test_per_sample_cpu(dtype, shape):
    # (9, 5, 130, 300): 156 KB per sample, so the 1 MiB slices split the batch in two
    nb, t, out, inn = shape
    g = _gen(2)
    a, b = _randn((nb, t, out), dtype, g), _randn((nb, t, inn), dtype, g)
    omega = _omega((out, inn), g)
    want = omega.clone()
    _ext.per_sample_abs_acc_(omega, a, b, 0.61)
    reference.per_sample_abs_acc_(want, a, b, 0.61)
    torch.testing.assert_close(omega, want, rtol=1e-5, atol=1e-4)


@needs_ext
@pytest.mark.parametrize("precision", ["exact", "accurate", "fast"])
def test_cpu_kernels_compute_fp32_in_every_precision(precision, caplog):
    """The CPU kernels have one (fp32) path: every precision gives the fp32 result; "fast" says so once."""
    g = _gen(21)
    a, b = _randn((4, 9, 12), torch.float32, g), _randn((4, 9, 10), torch.float32, g)
    omega = _omega((12, 10), g)
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a, b, 0.5, "exact")
    got = omega.clone()
    _ext._noticed.clear()
    with caplog.at_level("WARNING", logger="mas_local"):
        ops.per_sample_abs_acc_(got, a, b, 0.5, backend="ext", precision=precision)
        ops.per_sample_abs_acc_(got.clone(), a, b, 0.5, backend="ext", precision=precision)
        ops.abs_gemm_acc_(got.clone(), a[0], b[0], 0.5, backend="ext", precision=precision)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    notices = [r.getMessage() for r in caplog.records if "no fp8" in r.getMessage()]
    if precision == "fast":
        assert len(notices) == 2  # once per op, not once per call
        assert all("fp32" in m and "cpu" in m for m in notices)
    else:
        assert notices == []


@needs_ext
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
def test_penalty_cpu(pdtype, odtype):
    _check_penalty(_ext.penalty_grad_, PENALTY_SHAPES, pdtype, odtype, pdtype)


@needs_ext
@pytest.mark.parametrize("pdtype,gdtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_penalty_cpu_mixed_grad_dtype(pdtype, gdtype):
    _check_penalty(_ext.penalty_grad_, PENALTY_SHAPES, pdtype, torch.float32, gdtype)


@needs_ext
def test_penalty_cpu_mixed_list_and_views():
    g = _gen(3)
    base = _randn((40, 30), torch.float32, g)
    grads = [base.t(), _randn((1000,), torch.bfloat16, g)]  # a non-contiguous grad and a bf16 one
    params = [_randn((30, 40), torch.float32, g), _randn((1000,), torch.bfloat16, g)]
    anchors = [_randn((30, 40), torch.float32, g), _randn((1000,), torch.bfloat16, g)]
    omegas = [_omega((40, 30), g).t(), _omega((1000,), g, torch.bfloat16)]
    g_ref = [x.clone() for x in grads]
    value = _ext.penalty_grad_(grads, params, anchors, omegas, 1.3)
    expected = reference.penalty_grad_(g_ref, params, anchors, omegas, 1.3)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], g_ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], g_ref[1], rtol=2.0**-7, atol=1e-2)
    assert base.data_ptr() == grads[0].data_ptr()  # written in place


@needs_ext
@pytest.mark.parametrize("omega_format", [torch.channels_last, torch.contiguous_format])
def test_penalty_cpu_channels_last(omega_format):
    """channels_last parameters and grads are walked in memory order (grads updated in place); an Ω in
    another layout is copied into the grad's layout for the call."""
    g = _gen(22)
    shapes = [(4, 3, 5, 6), (2, 7, 3, 3)]
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)
    grads = [cl(_randn(s, torch.float32, g)) for s in shapes]
    params = [cl(_randn(s, torch.float32, g)) for s in shapes]
    anchors = [cl(_randn(s, torch.float32, g)) for s in shapes]
    omegas = [_omega(s, g).contiguous(memory_format=omega_format) for s in shapes]
    ptrs = [x.data_ptr() for x in grads]
    g_ref = [x.clone() for x in grads]
    value = _ext.penalty_grad_(grads, params, anchors, omegas, 0.8)
    expected = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.8)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    for x, y, ptr in zip(grads, g_ref, ptrs):
        assert x.data_ptr() == ptr and x.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@needs_ext
def test_penalty_cpu_float64_goes_to_reference():
    _check_penalty_f64 = _penalty_inputs([(4, 4)], torch.float64, torch.float32, torch.float64, 4)
    grads, params, anchors, omegas = _check_penalty_f64
    g_ref = [x.clone() for x in grads]
    value = _ext.penalty_grad_(grads, params, anchors, omegas, 0.5)
    expected = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.5)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grads[0], g_ref[0])


@needs_ext
def test_determinism_across_thread_counts():
    shapes = [(1_000_003,), (300, 301), (5,)]
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            grads, params, anchors, omegas = _penalty_inputs(shapes, torch.float32, torch.float32, torch.float32, 5)
            value = _ext.penalty_grad_(grads, params, anchors, omegas, 0.9)
            g = _gen(6)
            a, b = _randn((6, 11, 70), torch.float32, g), _randn((6, 11, 90), torch.float32, g)
            omega = _omega((70, 90), g)
            _ext.per_sample_abs_acc_(omega, a, b, 1.0)
            results.append((value, grads, omega))
    finally:
        torch.set_num_threads(threads)
    for value, grads, omega in results[1:]:
        assert torch.equal(value, results[0][0])
        assert all(torch.equal(x, y) for x, y in zip(grads, results[0][1]))
        assert torch.equal(omega, results[0][2])


# ---------------------------------------------------------------------------
# Through the public ops


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_ops_backend_ext(dtype):
    g = _gen(7)
    a, b = _randn((21, 9), dtype, g), _randn((21, 14), dtype, g)
    o1 = _omega((9, 14), g)
    o2 = o1.clone()
    ops.abs_gemm_acc_(o1, a, b, 0.5, backend="ext")
    ops.abs_gemm_acc_(o2, a, b, 0.5, backend="torch")
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)

    a3, b3 = _randn((4, 6, 9), dtype, g), _randn((4, 6, 14), dtype, g)
    ops.per_sample_abs_acc_(o1, a3, b3, 0.25, backend="ext")
    ops.per_sample_abs_acc_(o2, a3, b3, 0.25, backend="torch")
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-4)

    grads, params, anchors, omegas = _penalty_inputs(PENALTY_SHAPES, dtype, torch.float32, dtype, 8)
    g_ref = [x.clone() for x in grads]
    v1 = ops.penalty_grad_(grads, params, anchors, omegas, 0.3, backend="ext")
    v2 = ops.penalty_grad_(g_ref, params, anchors, omegas, 0.3, backend="torch")
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, g_ref):
        torch.testing.assert_close(x, y, rtol=GRAD_RTOL[dtype], atol=GRAD_ATOL[dtype])


@needs_ext
def test_penalty_with_parameters_that_require_grad():
    lin = torch.nn.Linear(7, 5)
    params = list(lin.parameters())
    g = _gen(9)
    anchors = [_randn(p.shape, torch.float32, g) for p in params]
    omegas = [_omega(p.shape, g) for p in params]
    grads = [torch.zeros_like(p) for p in params]
    g_ref = [x.clone() for x in grads]
    v1 = ops.penalty_grad_(grads, params, anchors, omegas, 1.0, backend="ext")
    v2 = reference.penalty_grad_(g_ref, params, anchors, omegas, 1.0)
    torch.testing.assert_close(v1, v2)
    for x, y in zip(grads, g_ref):
        torch.testing.assert_close(x, y)


# ---------------------------------------------------------------------------
# opcheck: the extension's ops and the public ops


def _opcheck_samples(device="cpu"):
    g = _gen(10)
    a, b = _randn((13, 6), torch.float32, g, device), _randn((13, 10), torch.float32, g, device)
    a3, b3 = _randn((3, 5, 6), torch.bfloat16, g, device), _randn((3, 5, 10), torch.bfloat16, g, device)
    omega = _omega((6, 10), g, device=device)
    grads, params, anchors, omegas = _penalty_inputs(
        [(4, 3), (11,)], torch.float32, torch.float32, torch.float32, 11, device
    )
    return a, b, a3, b3, omega, (grads, params, anchors, omegas)


@needs_ext
def test_opcheck_ext_ops():
    a, b, a3, b3, omega, (grads, params, anchors, omegas) = _opcheck_samples()
    ext = torch.ops.mas_local_ext
    torch.library.opcheck(ext.abs_gemm_acc_.default, (omega.clone(), a, b, 0.5, "accurate"))
    torch.library.opcheck(ext.per_sample_abs_acc_.default, (omega.clone(), a3, b3, 0.5, "accurate"))
    torch.library.opcheck(ext.penalty_grad_.default, ([x.clone() for x in grads], params, anchors, omegas, 0.7))
    assert isinstance(ext.has_cuda(), bool)


@pytest.mark.parametrize("backend", PUBLIC_BACKENDS)
def test_opcheck_public_ops(backend):
    a, b, a3, b3, omega, (grads, params, anchors, omegas) = _opcheck_samples()
    torch.library.opcheck(ops.abs_gemm_acc_, (omega.clone(), a, b, 0.5, backend))
    torch.library.opcheck(ops.per_sample_abs_acc_, (omega.clone(), a3, b3, 0.5, backend, "exact"))
    torch.library.opcheck(ops.penalty_grad_, ([x.clone() for x in grads], params, anchors, omegas, 0.7, backend))


# ---------------------------------------------------------------------------
# torch.compile traces through the public ops and the extension's ops


@needs_ext
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()

    def step(omega, a, b, grads, params, anchors, omegas):
        ops.abs_gemm_acc_(omega, a * 2.0, b, 0.5, backend="ext")
        value = ops.penalty_grad_(grads, params, anchors, omegas, 0.8, backend="ext")
        direct = torch.ops.mas_local_ext.penalty_grad_(grads, params, anchors, omegas, 0.0)
        return value * 2.0 + direct

    compiled = torch.compile(step, fullgraph=True)
    a, b, _, _, omega, (grads, params, anchors, omegas) = _opcheck_samples()
    o_c, g_c = omega.clone(), [x.clone() for x in grads]
    o_e, g_e = omega.clone(), [x.clone() for x in grads]
    got = compiled(o_c, a, b, g_c, params, anchors, omegas)
    reference.abs_gemm_acc_(o_e, a * 2.0, b, 0.5)
    want = reference.penalty_grad_(g_e, params, anchors, omegas, 0.8) * 2.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(o_c, o_e, rtol=1e-5, atol=1e-5)
    for x, y in zip(g_c, g_e):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------
# CUDA kernels (run on a GPU machine with a CUDA build)


def _cuda_tolerance(dtype, precision):
    """Largest |Ω − Ω_exact| on the GPU, as a fraction of α Σ|a·b| (the module docstring)."""
    if precision == "fast" and dtype not in (torch.bfloat16, torch.float16):
        return 2.0**-7
    if dtype != torch.float32:
        return 1e-4
    return 1e-5 if precision == "exact" else 2.0**-9


def _assert_within_bound(got, want, bound, tol):
    err = (got.double() - want.double()).abs()
    limit = tol * bound + 1e-6 * bound.max()
    worst = (err / limit.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds {tol:.3g}·Σ|a·b| (worst ratio {worst:.3g})"


@needs_cuda_ext
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES + [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("precision", ["accurate", "exact", "fast"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 13, 29), (300, 130, 257), (5000, 70, 33)])
def test_abs_gemm_cuda(dtype, precision, shape):
    # (5000, 70, 33) with "exact": the FMA path cuts R into pieces with a zero-padded tail
    r, out, inn = shape
    da, db = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    g = _gen(12)
    a, b = _randn((r, out), da, g, "cuda"), _randn((r, inn), db, g, "cuda")
    omega = _omega((out, inn), g, device="cuda")
    want = omega.clone()
    _ext.abs_gemm_acc_(omega, a, b, 0.37, precision)
    reference.abs_gemm_acc_(want, a, b, 0.37, "exact")
    bound = 0.37 * a.double().abs().t() @ b.double().abs()
    tol = _cuda_tolerance(da if da == db else torch.float32, precision)
    _assert_within_bound(omega, want, bound, tol)


@needs_cuda_ext
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["accurate", "exact", "fast"])
@pytest.mark.parametrize("dtype", DTYPES + [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1, 1), (3, 37, 45, 133), (2, 40, 128, 256), (64, 9, 17, 24), (5, 16, 130, 129), (4, 0, 8, 8)],
)
def test_per_sample_cuda(dtype, precision, shape):
    # ragged edges, the aligned vector-load path, batch splits (few tiles, large batch), T = 0;
    # fp32 "accurate" runs the TF32 tensor-core kernel, "exact" the FMA kernel, "fast" bf16
    nb, t, out, inn = shape
    da, db = dtype if isinstance(dtype, tuple) else (dtype, dtype)
    g = _gen(13)
    a, b = _randn((nb, t, out), da, g, "cuda"), _randn((nb, t, inn), db, g, "cuda")
    omega = _omega((out, inn), g, device="cuda")
    want = omega.clone()
    _ext.per_sample_abs_acc_(omega, a, b, 0.61, precision)
    reference.per_sample_abs_acc_(want, a, b, 0.61, "exact")
    bound = 0.61 * a.reshape(-1, out).double().abs().t() @ b.reshape(-1, inn).double().abs()
    tol = _cuda_tolerance(da if da == db else torch.float32, precision)
    _assert_within_bound(omega, want, bound, tol)


@needs_cuda_ext
@pytest.mark.cuda
@pytest.mark.parametrize("pdtype", DTYPES)
@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
def test_penalty_cuda(pdtype, odtype):
    _check_penalty(_ext.penalty_grad_, PENALTY_SHAPES + [(200_003,)], pdtype, odtype, pdtype, device="cuda")


@needs_cuda_ext
@pytest.mark.cuda
def test_penalty_cuda_mixed_groups_and_misaligned():
    g = _gen(14)
    flat = _randn((1001,), torch.float32, g, "cuda")
    grads = [flat[1:], _randn((300,), torch.bfloat16, g, "cuda"), _randn((5, 7), torch.float32, g, "cuda").t()]
    params = [
        _randn((1000,), torch.float32, g, "cuda"),
        _randn((300,), torch.bfloat16, g, "cuda"),
        _randn((7, 5), torch.float32, g, "cuda"),
    ]
    anchors = [_randn(p.shape, p.dtype, g, "cuda") for p in params]
    omegas = [
        _omega((1000,), g, device="cuda"),
        _omega((300,), g, torch.bfloat16, "cuda"),
        _omega((7, 5), g, device="cuda"),
    ]
    g_ref = [x.clone() for x in grads]
    value = _ext.penalty_grad_(grads, params, anchors, omegas, 0.4)
    expected = reference.penalty_grad_(g_ref, params, anchors, omegas, 0.4)
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], g_ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[1], g_ref[1], rtol=2.0**-7, atol=1e-2)
    torch.testing.assert_close(grads[2], g_ref[2], rtol=1e-6, atol=1e-6)


@needs_cuda_ext
@pytest.mark.cuda
def test_penalty_cuda_deterministic():
    shapes = [(3_000_001,), (512, 513), (3,)]
    values = []
    for _ in range(3):
        grads, params, anchors, omegas = _penalty_inputs(
            shapes, torch.bfloat16, torch.float32, torch.float32, 15, "cuda"
        )
        values.append(_ext.penalty_grad_(grads, params, anchors, omegas, 1.0).item())
    assert values[0] == values[1] == values[2]


@needs_cuda_ext
@pytest.mark.cuda
def test_penalty_cuda_value_does_not_depend_on_alignment():
    """The same values at 16-byte aligned and misaligned addresses give a bit-identical value."""
    shapes = [(70_001,), (300, 7)]
    case = _penalty_inputs(shapes, torch.float32, torch.float32, torch.float32, 16, "cuda")

    def shifted(t):  # the same values one element past a 16-byte boundary
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    aligned = _ext.penalty_grad_([x.clone() for x in case[0]], *case[1:], 0.7)
    moved = _ext.penalty_grad_([shifted(x) for x in case[0]], *[[shifted(x) for x in ts] for ts in case[1:]], 0.7)
    assert torch.equal(aligned, moved)


@needs_cuda_ext
@pytest.mark.cuda
def test_penalty_cuda_refuses_graph_capture():
    grads, params, anchors, omegas = _penalty_inputs([(1000,)], torch.float32, torch.float32, torch.float32, 17, "cuda")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream), pytest.raises(RuntimeError, match="CUDA-graph capture"):
        with torch.cuda.graph(graph, stream=stream):
            ops.penalty_grad_(grads, params, anchors, omegas, 0.5, backend="ext")


@needs_cuda_ext
@pytest.mark.cuda
def test_public_ops_backend_ext_cuda():
    a, b, a3, b3, omega, (grads, params, anchors, omegas) = _opcheck_samples("cuda")
    o1, o2 = omega.clone(), omega.clone()
    ops.per_sample_abs_acc_(o1, a3, b3, 0.5, backend="ext")
    ops.per_sample_abs_acc_(o2, a3, b3, 0.5, backend="torch")
    torch.testing.assert_close(o1, o2, rtol=1e-3, atol=1e-3)
    torch.library.opcheck(torch.ops.mas_local_ext.per_sample_abs_acc_.default, (omega.clone(), a3, b3, 0.5, "exact"))
    torch.library.opcheck(
        torch.ops.mas_local_ext.penalty_grad_.default, ([x.clone() for x in grads], params, anchors, omegas, 0.7)
    )


@needs_ext
def test_baseline_isa_path_cpu():
    # The CPU kernels also exist compiled for the baseline ISA (no AVX2); force that copy in a fresh process.
    import os
    import subprocess
    import sys

    code = (
        "import torch; from mas_local.ops import ext as _ext, reference as R\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for dt in (torch.float32, torch.bfloat16, torch.float16):\n"
        "    mk = lambda: torch.randn(1037, generator=g).to(dt)\n"
        "    gr, p, a = [mk()], [mk()], [mk()]\n"
        "    o = [torch.rand(1037, generator=g) + 0.1]\n"
        "    gr2 = [gr[0].clone()]\n"
        "    v = _ext.penalty_grad_(gr, p, a, o, 0.5); w = R.penalty_grad_(gr2, p, a, o, 0.5)\n"
        "    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dt]\n"
        "    torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6)\n"
        "    torch.testing.assert_close(gr[0], gr2[0], rtol=tol, atol=1e-2)\n"
        "    A = torch.randn(3, 5, 7, generator=g).to(dt); B = torch.randn(3, 5, 9, generator=g).to(dt)\n"
        "    om = torch.rand(7, 9, generator=g); om2 = om.clone()\n"
        "    _ext.per_sample_abs_acc_(om, A, B, 0.3); R.per_sample_abs_acc_(om2, A, B, 0.3)\n"
        "    torch.testing.assert_close(om, om2, rtol=1e-5, atol=1e-4)\n"
        "    _ext.abs_gemm_acc_(om, A[0], B[0], 0.3); R.abs_gemm_acc_(om2, A[0], B[0], 0.3)\n"
        "    torch.testing.assert_close(om, om2, rtol=1e-5, atol=1e-4)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, MAS_LOCAL_EXT_BASELINE_ISA="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


@needs_ext
def test_supports_and_backend_resolution():
    from mas_local import backend

    assert _ext.supports("cpu") is None
    assert backend.unavailable_reason("ext", "cpu") is None
    name, impl = backend.resolve("penalty_grad", "cpu", "ext")
    assert name == "ext" and impl is _ext.penalty_grad_
    reason = _ext.supports("cuda")
    if _ext.has_cuda():
        assert reason is None
    else:
        assert isinstance(reason, str) and "without CUDA" in reason
    assert isinstance(_ext.supports("meta"), str)
