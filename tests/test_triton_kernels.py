"""The Triton kernels (``mas_local.kernels``) against the torch reference.

Without CUDA the kernels run under the Triton interpreter: ``TRITON_INTERPRET=1``
is set here before ``triton`` is imported (if another test module imported
triton earlier without it, this file runs again in a fresh process). With CUDA the same tests compile
and run the kernels on the GPU, and the tests marked ``cuda`` run too.

Tolerances (``rtol``; ``atol`` is ``rtol`` times the largest entry of the exact
increment ``α·Σ|…|``, so near-zero entries are judged on the increment's scale):

* interpreter, any operand dtype: 1e-5 (operands are upcast to fp32 after the
  load and multiplied exactly; only the summation order differs);
* GPU, fp16/bf16 operands: 1e-4 (products exact in fp32, fp32 accumulation);
* GPU, fp32 operands, ``precision="accurate"`` and the per-sample op: 5e-3
  (TF32 rounds each operand to 10 mantissa bits: ≤ 2·2⁻¹¹ per product);
* GPU, ``precision="exact"``: 1e-5;
* GPU, ``precision="fast"`` (fp8 e4m3): relative Frobenius error ≤ 1e-2 at R = 4096;
* penalty value: 1e-5 relative (fp32 partials vs the fp64 reference); grads:
  fp32 1e-5, fp16 2e-3, bf16 1.6e-2 (≤ 2 ulp: the reference rounds the update to
  the grad's dtype before adding, the kernel rounds once after);
* fp8 pre-pass values: equal to torch's e4m3 conversion (GPU), ≥ 90% equal under
  the interpreter, whose e4m3 rounding is wrong when it carries into the exponent.

Also here, on CPU: every kernel compiles to sm_90 PTX (``triton.compile``, no GPU
needed; dots must use wgmma + cp.async, streaming kernels 16-byte accesses, shared
memory within the limit), and ``bench/gpu_table.py --small`` runs end to end.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import mas_local  # noqa: E402
from mas_local import ops
from mas_local.ops import reference  # noqa: E402

K = importlib.import_module("mas_local.kernels")

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
# Triton was imported earlier in this process without TRITON_INTERPRET=1 (another test
# module loaded the backends): the kernels cannot run on CPU here, so the whole file
# runs again in a fresh process with the variable set (test_in_fresh_process).
RERUN = not CUDA and not K.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"
if not CUDA and not K.INTERPRET and not RERUN:
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1: the Triton kernels cannot run here", allow_module_level=True)


@pytest.fixture(autouse=True)
def _fresh_process_guard(request):
    if RERUN and request.node.originalname != "test_in_fresh_process":
        pytest.skip("triton was imported before TRITON_INTERPRET=1; covered by test_in_fresh_process")


def test_in_fresh_process():
    if not RERUN:
        pytest.skip("this process runs the kernels directly")
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (real compilation, tensor cores, fp8)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def randn(*shape, dtype=torch.float32, seed=0):
    """Fresh random data (never zeros), made on the CPU then moved to the test device."""
    return torch.randn(*shape, generator=_gen(seed)).to(device=DEV, dtype=dtype)


def rand_omega(*shape, seed=1):
    """Ω pre-filled with random positive values, to test accumulation."""
    return (torch.rand(*shape, generator=_gen(seed)) + 0.5).to(DEV)


def gemm_rtol(dtype, precision="accurate"):
    if not CUDA:
        return 1e-5
    if dtype == torch.float32:
        return 1e-5 if precision == "exact" else 5e-3
    return 1e-4


def assert_acc_close(got, before, want, rtol):
    """``got`` vs ``want`` (both Ω after the op) with atol on the scale of the increment."""
    scale = (want - before).abs().max().item()
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-30))


# --------------------------------------------------------------------------- availability


def test_supports_this_device():
    assert K.supports(DEV) is None
    assert mas_local.backend.unavailable_reason("triton", DEV) is None
    assert "meta" in K.supports("meta")


def test_cpu_without_interpreter_gives_a_reason():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import mas_local.kernels as k; print(k.supports('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "TRITON_INTERPRET" in out.stdout


# --------------------------------------------------------------------------- abs-GEMM

GEMM_SHAPES = [(1, 1, 1), (1, 17, 5), (37, 21, 45), (64, 32, 16), (33, 1, 19)]  # (R, out, in)


@pytest.mark.parametrize("design", ["fused", "prepass", "prepass-triton", "prepass-overlap"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_abs_gemm_matches_reference(shape, dtype, design):
    r, m, n = shape
    a, b = randn(r, m, dtype=dtype, seed=2), randn(r, n, dtype=dtype, seed=3)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.37)
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 0.37, "accurate", design=design)
    assert_acc_close(got, omega, want, gemm_rtol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("design", ["fused", "prepass"])
def test_abs_gemm_strided_and_transposed_views(dtype, design):
    r, m, n = 29, 23, 18
    a = randn(m, r, dtype=dtype, seed=4).t()  # [R, out] with strides (1, R)
    b = randn(r, 2 * n + 1, dtype=dtype, seed=5)[:, 1::2]  # column stride 2, offset 1
    assert not a.is_contiguous() and not b.is_contiguous()
    omega_big = rand_omega(n, m).t()  # a transposed Ω view
    want = omega_big.clone()
    reference.abs_gemm_acc_(want, a, b, 1.5)
    got = omega_big.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.5, "accurate", design=design)
    assert_acc_close(got, omega_big, want, gemm_rtol(dtype))


@pytest.mark.parametrize("precision", ["accurate", "exact", "fast"])
def test_abs_gemm_precisions_through_public_op(precision):
    r, m, n = 45, 19, 26
    a, b = randn(r, m, seed=6), randn(r, n, seed=7)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.5)
    got = omega.clone()
    ops.abs_gemm_acc_(got, a, b, 0.5, backend="triton", precision=precision)
    if precision == "fast" and CUDA and K.abs_gemm._fp8_capable(DEV):
        assert ((got - want).norm() / (want - omega).norm()).item() <= 5e-2  # fp8 at small R; see cuda test
    else:
        assert_acc_close(got, omega, want, gemm_rtol(torch.float32, precision))


def test_abs_gemm_empty_rows_is_a_no_op():
    omega = rand_omega(3, 4)
    got = omega.clone()
    K.abs_gemm_acc_(got, randn(0, 3), randn(0, 4), 1.0, "accurate")
    assert torch.equal(got, omega)


def test_abs_gemm_prepass_chunks_rows(monkeypatch):
    monkeypatch.setattr(K.abs_gemm, "SCRATCH_BYTES", 8 * (7 + 5) * 4)  # 8 rows per chunk → 256-row floor
    r, m, n = 600, 7, 5
    a, b = randn(r, m, seed=8), randn(r, n, seed=9)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0)
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0, "accurate", design="prepass-triton")
    assert_acc_close(got, omega, want, gemm_rtol(torch.float32))


def test_abs_copy_is_exact_bitwise():
    a = randn(13, 9, dtype=torch.bfloat16, seed=10)[:, ::2]
    b = randn(13, 4, dtype=torch.float16, seed=11)
    da, _ = K.abs_gemm.abs_copy(a, a)
    db, _ = K.abs_gemm.abs_copy(b, b)
    assert da.is_contiguous() and torch.equal(da, a.abs())
    assert torch.equal(db, b.abs())


def test_fp8_prepass_layout_and_scales():
    """The "fast" pre-pass: exact per-tensor scales, K-major e4m3 copies of |x|·448/amax, zero padding.

    The interpreter's e4m3 rounding is wrong when rounding carries into the exponent
    (7.97 → 4 instead of 8), so on CPU the values are compared where it is right
    (≥ 90%); on the GPU (hardware conversion) all must match torch's conversion.
    """
    a = randn(37, 21, dtype=torch.bfloat16, seed=58)[:, ::1]
    b = randn(74, 45, dtype=torch.bfloat16, seed=59)[::2] * 3  # row stride 2·45
    a8, b8, s_a, s_b = K.abs_gemm.fp8_prepass(a, b)
    assert a8.shape == (21, 48) and b8.shape == (45, 48) and a8.is_contiguous() and b8.is_contiguous()
    for x, x8, s in ((a, a8, s_a), (b, b8, s_b)):
        assert torch.equal(s.reshape(()), x.float().abs().max() / 448.0)  # fp32 division, like the kernel
        want = (x.float().abs() / s).t().to(torch.float8_e4m3fn).float()
        got = x8[:, :37].float()
        assert torch.all(x8[:, 37:].float() == 0)
        match = (got == want).float().mean().item()
        assert match == 1.0 if CUDA else match >= 0.9, match


# --------------------------------------------------------------------------- per-sample


PS_SHAPES = [(1, 1, 1, 1), (3, 19, 21, 33), (2, 40, 17, 5), (5, 1, 16, 16), (3, 32, 16, 17)]  # (B, T, out, in)


@pytest.mark.parametrize("loop", ["flat", "nested"])
@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PS_SHAPES)
def test_per_sample_matches_reference(shape, dtype, split, loop):
    nb, t, m, n = shape
    a, b = randn(nb, t, m, dtype=dtype, seed=12), randn(nb, t, n, dtype=dtype, seed=13)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a, b, 0.25)
    got = omega.clone()
    K.per_sample_abs.per_sample_abs_acc_(got, a, b, 0.25, split=split, loop=loop)
    assert_acc_close(got, omega, want, gemm_rtol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_strided_views(dtype):
    nb, t, m, n = 3, 11, 13, 10
    a = randn(t, nb, m, dtype=dtype, seed=14).transpose(0, 1)  # [B, T, out], batch not outermost
    b = randn(nb, n, t, dtype=dtype, seed=15).transpose(1, 2)  # [B, T, in], in-stride T
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a, b, 1.0)
    got = omega.clone()
    ops.per_sample_abs_acc_(got, a, b, 1.0, backend="triton")
    assert_acc_close(got, omega, want, gemm_rtol(dtype))


def test_per_sample_split_is_deterministic():
    a, b = randn(6, 9, 20, seed=16), randn(6, 9, 12, seed=17)
    omega = rand_omega(20, 12)
    outs = []
    for _ in range(2):
        got = omega.clone()
        K.per_sample_abs.per_sample_abs_acc_(got, a, b, 1.0, split=3)
        outs.append(got)
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- penalty

PEN_SHAPES = [(300,), (5, 7), (1,), (128,), (129,), (3, 4, 5), (0,)]
GRAD_RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _penalty_case(pdtype, odtype, shapes=PEN_SHAPES, seed=20, unaligned=False):
    params, anchors, omegas, grads = [], [], [], []
    for i, s in enumerate(shapes):
        n = 1
        for d in s:
            n *= d
        if unaligned:  # storage offset 1: not 16-byte aligned
            p = randn(n + 1, dtype=pdtype, seed=seed + 4 * i)[1:].view(s)
        else:
            p = randn(*s, dtype=pdtype, seed=seed + 4 * i)
        params.append(p)
        anchors.append(randn(*s, dtype=pdtype, seed=seed + 4 * i + 1))
        omegas.append(torch.rand(*s, generator=_gen(seed + 4 * i + 2)).to(DEV, odtype))
        grads.append(randn(*s, dtype=pdtype, seed=seed + 4 * i + 3))
    return grads, params, anchors, omegas


def _check_penalty(case, lam, run):
    grads, params, anchors, omegas = case
    want_g = [g.clone() for g in grads]
    want = reference.penalty_grad_(want_g, params, anchors, omegas, lam)
    got_g = [g.clone() for g in grads]
    got = run(got_g, params, anchors, omegas, lam)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == DEV.type
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    rtol = GRAD_RTOL[grads[0].dtype]
    for gg, wg in zip(got_g, want_g):
        torch.testing.assert_close(gg.float(), wg.float(), rtol=rtol, atol=rtol)
    return got


@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pdtype", DTYPES)
def test_penalty_matches_reference(pdtype, odtype):
    _check_penalty(_penalty_case(pdtype, odtype), 0.7, K.penalty_grad_)


def test_penalty_mixed_groups_and_unaligned_tensors():
    grads, params, anchors, omegas = _penalty_case(torch.float32, torch.float32)
    g2, p2, a2, o2 = _penalty_case(torch.bfloat16, torch.bfloat16, shapes=[(70,), (2, 65)], seed=60)
    g3, p3, a3, o3 = _penalty_case(torch.float32, torch.bfloat16, shapes=[(257,), (6,)], seed=80, unaligned=True)
    case = (grads[:3] + g2 + g3, params[:3] + p2 + p3, anchors[:3] + a2 + a3, omegas[:3] + o2 + o3)
    # the grads of mixed dtypes get the loosest per-dtype tolerance through the first grad's dtype: check per group
    want_g = [g.clone() for g in case[0]]
    want = reference.penalty_grad_(want_g, *case[1:], 1.3)
    got_g = [g.clone() for g in case[0]]
    got = K.penalty_grad_(got_g, *case[1:], 1.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for gg, wg in zip(got_g, want_g):
        rtol = GRAD_RTOL[gg.dtype]
        torch.testing.assert_close(gg.float(), wg.float(), rtol=rtol, atol=rtol)


def test_penalty_through_public_op_and_empty_list():
    _check_penalty(
        _penalty_case(torch.float32, torch.float32), 2.0, lambda *args: ops.penalty_grad_(*args, backend="triton")
    )
    assert ops.penalty_grad_([], [], [], [], 1.0, backend="triton").item() == 0.0


def test_penalty_value_is_bit_identical_between_runs():
    grads, params, anchors, omegas = _penalty_case(torch.float32, torch.float32, shapes=[(1000,), (33, 31), (7,)])
    values = [K.penalty_grad_([g.clone() for g in grads], params, anchors, omegas, 0.9) for _ in range(3)]
    assert all(torch.equal(v, values[0]) for v in values[1:])


def test_penalty_non_contiguous_and_float64_run_the_reference():
    p = randn(6, 8, seed=50).t()
    case = ([randn(8, 6, seed=51)], [p], [randn(8, 6, seed=52)], [randn(6, 8, seed=53).abs().t()])
    _check_penalty(case, 0.3, K.penalty_grad_)
    case64 = _penalty_case(torch.float32, torch.float32, shapes=[(5, 3)])
    case64 = tuple([t.double() for t in ts] if i < 3 else ts for i, ts in enumerate(case64))
    want_g = [g.clone() for g in case64[0]]
    want = reference.penalty_grad_(want_g, *case64[1:], 0.3)
    got_g = [g.clone() for g in case64[0]]
    got = K.penalty_grad_(got_g, *case64[1:], 0.3)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(got_g, want_g))


def test_float64_operands_run_the_reference():
    a, b = randn(9, 4, dtype=torch.float64, seed=54), randn(9, 5, dtype=torch.float64, seed=55)
    omega = rand_omega(4, 5)
    want, got = omega.clone(), omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.5)
    ops.abs_gemm_acc_(got, a, b, 0.5, backend="triton")
    assert torch.equal(got, want)
    a3, b3 = randn(2, 3, 4, dtype=torch.float64, seed=56), randn(2, 3, 5, dtype=torch.float64, seed=57)
    want, got = omega.clone(), omega.clone()
    reference.per_sample_abs_acc_(want, a3, b3, 0.5)
    ops.per_sample_abs_acc_(got, a3, b3, 0.5, backend="triton")
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("design", ["auto", "fused", "prepass", "prepass-triton", "prepass-overlap"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_abs_gemm_tensor_cores(dtype, design):
    r, m, n = 1000, 384, 520
    a, b = randn(r, m, dtype=dtype, seed=30), randn(r, n, dtype=dtype, seed=31)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / r)
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0 / r, "accurate", design=design)
    assert_acc_close(got, omega, want, gemm_rtol(dtype))
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0 / r, "exact", design=design)
    assert_acc_close(got, omega, want, gemm_rtol(dtype, "exact"))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 256, 384), (4090, 200, 136)])
def test_gpu_abs_gemm_fast_fp8(shape):
    if not K.abs_gemm._fp8_capable(DEV):
        pytest.skip("GPU without fp8 (compute capability < 8.9): 'fast' falls back to 'accurate'")
    r, m, n = shape
    a, b = randn(r, m, dtype=torch.bfloat16, seed=32), randn(r, n, dtype=torch.bfloat16, seed=33)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / r)
    got = omega.clone()
    K.abs_gemm_acc_(got, a, b, 1.0 / r, "fast")
    rel = ((got - want).norm() / (want - omega).norm()).item()
    assert rel <= 1e-2, rel


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("loop", ["flat", "nested"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_per_sample_auto_split(dtype, loop):
    nb, t, m, n = 8, 130, 256, 200  # few tiles: choose_split picks > 1
    a, b = randn(nb, t, m, dtype=dtype, seed=34), randn(nb, t, n, dtype=dtype, seed=35)
    assert K.per_sample_abs.choose_split(rand_omega(m, n), nb) > 1
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a, b, 0.5)
    got = omega.clone()
    K.per_sample_abs.per_sample_abs_acc_(got, a, b, 0.5, loop=loop)
    assert_acc_close(got, omega, want, gemm_rtol(dtype))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
def test_gpu_penalty_large_and_deterministic(odtype):
    shapes = [(1024, 1000), (70001,), (3,), (512, 129)]
    case = _penalty_case(torch.float32, odtype, shapes=shapes, seed=40)
    first = _check_penalty(case, 0.5, K.penalty_grad_)
    for _ in range(3):
        again = K.penalty_grad_([g.clone() for g in case[0]], *case[1:], 0.5)
        assert torch.equal(again, first)


# --------------------------------------------------------------------------- sm_90 compilation (no GPU needed)

_SM90_CHECK = r'''
import sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except Exception as exc:
    print("SKIP: no NVIDIA Triton backend:", exc)
    sys.exit(0)
from mas_local.kernels import abs_gemm as ag, per_sample_abs as ps, penalty as pen

assert not ag.INTERPRET
TARGET = GPUTarget("cuda", 90, 32)


SMEM_MAX = 232448  # bytes of shared memory a block may use on sm_90


def ptx(fn, types, consts, div16=(), num_warps=4, num_stages=3):
    """PTX for sm_90 with the specialisations a real launch on aligned, contiguous data gets."""
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = triton.compiler.ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=TARGET, options=opts)
    assert kernel.metadata.shared <= SMEM_MAX, (fn.__name__, consts, kernel.metadata.shared)
    return kernel.asm["ptx"]


def gemm(elem, abs_in_loop, precision, fp8=False):
    size = {"*bf16": 2, "*fp32": 4, "*fp8e4nv": 1}[elem]
    cfg = ag.fitting_configs(ag._GPU_FP8_CONFIGS if fp8 else ag._GPU_CONFIGS, size)[0]  # what AUTOTUNE=0 runs
    types = dict(omega_ptr="*fp32", a_ptr=elem, b_ptr=elem, scale_a_ptr="*fp32", scale_b_ptr="*fp32", M="i32",
                 N="i32", K="i32", s_ak="i32", s_am="i32", s_bk="i32", s_bn="i32", s_om="i32", s_on="i32",
                 alpha="fp32")
    unit = dict(s_ak=1, s_bk=1, s_on=1) if fp8 else dict(s_am=1, s_bn=1, s_on=1)
    consts = dict(ABS=abs_in_loop, UPCAST=False, SCALED=fp8, PRECISION=precision, **unit, **cfg.kwargs)
    div = [n for n in ("omega_ptr", "a_ptr", "b_ptr", "M", "N", "K", "s_ak", "s_am", "s_bk", "s_bn", "s_om")
           if n not in consts]
    return ptx(ag._abs_gemm_kernel, types, consts, div, cfg.num_warps, cfg.num_stages)


for elem, abs_in_loop, prec in (("*bf16", True, "tf32"), ("*bf16", False, "tf32"), ("*fp32", True, "tf32")):
    code = gemm(elem, abs_in_loop, prec)
    assert "wgmma.mma_async" in code and "cp.async" in code, (elem, abs_in_loop, prec)
code = gemm("*fp32", True, "ieee")
assert "wgmma" not in code
code = gemm("*fp8e4nv", False, "tf32", fp8=True)
assert "wgmma.mma_async" in code and "e4m3" in code

for elem, accum in (("*bf16", True), ("*bf16", False), ("*fp32", True)):  # FLAT=accum: both loop forms
    cfg = ag.fitting_configs(ps._GPU_CONFIGS, 2 if elem == "*bf16" else 4)[0]
    types = dict(out_ptr="*fp32", a_ptr=elem, b_ptr=elem, NB="i32", T="i32", M="i32", N="i32",
                 per_split="i32", s_ab="i32", s_at="i32", s_bb="i32", s_bt="i32", s_os="i32", s_om="i32",
                 alpha="fp32")
    consts = dict(s_am=1, s_bn=1, s_on=1, ACCUM=accum, UPCAST=False, PRECISION="tf32", FLAT=accum, **cfg.kwargs)
    div = ("out_ptr", "a_ptr", "b_ptr", "T", "M", "N", "s_ab", "s_at", "s_bb", "s_bt", "s_os", "s_om")
    code = ptx(ps._per_sample_kernel, types, consts, div, cfg.num_warps, cfg.num_stages)
    assert "wgmma.mma_async" in code and "cp.async" in code
ptx(ps._reduce_partials_kernel, dict(omega_ptr="*fp32", part_ptr="*fp32", numel="i32", n_split="i32",
                                     alpha="fp32"), dict(BLOCK=1024), ("omega_ptr", "part_ptr", "numel"))

types = dict(a_ptr="*i16", da_ptr="*i16", a_rows="i32", a_cols="i32", a_s0="i32", b_ptr="*i16", db_ptr="*i16",
             b_rows="i32", b_cols="i32", b_s0="i32", tiles_a="i32")
code = ptx(ag._abs_copy_kernel, types, dict(a_s1=1, b_s1=1, SIGN_MASK=0x7FFF, BR=64, BC=128),
           ("a_ptr", "da_ptr", "a_cols", "a_s0", "b_ptr", "db_ptr", "b_cols", "b_s0"))
assert "ld.global.v4" in code and "st.global.v4" in code
types = dict(a_ptr="*bf16", a_rows="i32", a_cols="i32", a_s0="i32", b_ptr="*bf16", b_rows="i32", b_cols="i32",
             b_s0="i32", tiles_a="i32", amax_ptr="*i32")
code = ptx(ag._amax_kernel, types, dict(a_s1=1, b_s1=1, BR=64, BC=64), ("a_ptr", "b_ptr", "a_cols", "a_s0",
                                                                          "b_cols", "b_s0"))
assert "atom" in code
types = dict(a_ptr="*bf16", da_ptr="*fp8e4nv", a_cols="i32", a_s0="i32", b_ptr="*bf16", db_ptr="*fp8e4nv",
             b_cols="i32", b_s0="i32", rows="i32", rows_pad="i32", tiles_a="i32", amax_ptr="*i32", scale_ptr="*fp32")
ptx(ag._fp8_cast_kernel, types, dict(a_s1=1, b_s1=1, BR=64, BC=64),
    ("a_ptr", "b_ptr", "da_ptr", "db_ptr", "a_cols", "b_cols", "a_s0", "b_s0", "rows_pad"))

for pdt, odt in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp32")):
    al = {"fp32": 4, "bf16": 8, "fp16": 8}
    types = dict(g_base="*" + pdt, p_base="*" + pdt, a_base="*" + pdt, o_base="*" + odt, table_ptr="*i64",
                 part_ptr="*fp64", two_lam="fp32")
    consts = dict(AG=al[pdt], AP=al[pdt], AA=al[pdt], AO=al[odt], BLOCK=2048, ITERS=32)
    code = ptx(pen._penalty_kernel, types, consts, ("g_base", "p_base", "a_base", "o_base", "table_ptr"), 8)
    assert "ld.global.v4" in code and "st.global.v4" in code, (pdt, odt)
ptx(pen._final_sum_kernel, dict(part_ptr="*fp64", n="i32", lam="fp32", out_ptr="*fp32"), dict(BLOCK=1024))
print("OK")
'''


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel compiles to sm_90 PTX (tensor-core dots use wgmma + cp.async; the memory-bound
    kernels use 16-byte vector accesses). Triton compiles on a CPU machine; no GPU is needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SM90_CHECK], env=env, capture_output=True, text=True, timeout=300)
    if out.stdout.startswith("SKIP"):
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.skipif(CUDA, reason="on a GPU bench/gpu_check.sh runs the full table instead")
def test_gpu_table_small_smoke(tmp_path):
    """bench/gpu_table.py --small runs end to end on CPU (interpreter) and its checks pass."""
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "gpu_table.py")
    out_md = tmp_path / "table.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, script, "--small", "--only", "abs,sample,penalty", "--out", str(out_md)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out_md.read_text()
    assert "| abs-GEMM small bf16 | triton accurate |" in text and "BAD" not in text and "FAILED" not in text
