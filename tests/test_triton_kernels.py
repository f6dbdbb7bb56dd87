"""The Triton kernels (``mas_local.kernels``) against the torch reference, in every precision.

Without CUDA the kernels run under the Triton interpreter (see ``tests/triton_interpreter.py``);
with CUDA the same tests compile and run them on the GPU, and the ``cuda``-marked ones run too.

Tolerances follow the precision contract of ``docs/triton.md``: the error of each
element of Ω is bounded by ``tol · α Σ|a·b|`` (the sum of absolute products, which
for the per-sample op can exceed the increment itself, since ``Σ_t a·b`` cancels):

* interpreter: 1e-5 (operands upcast to fp32 after the load, exact products; only the
  summation order differs), except ``"fast"`` with fp32 operands: 2⁻⁶ (the interpreter
  rounds fp32 → bf16 by truncation: ≤ 2⁻⁷ per operand);
* GPU, ``"exact"`` fp32: 1e-5; ``"accurate"`` fp32 (TF32, rounded or truncated: ≤ 2⁻¹⁰ per operand): 2⁻⁹;
  16-bit operands in any mode: 1e-4 (exact products, tensor-core fp32 accumulation);
  ``"fast"`` fp32 in the per-sample op (bf16, round to nearest): 2⁻⁷;
* GPU abs-GEMM ``"fast"`` (fp8 e4m3): relative Frobenius error ≤ 1e-2 at R = 4096;
* penalty value: 1e-5 relative (fp32 partials vs the fp64 reference); grads: fp32
  1e-5, fp16 2e-3, bf16 1.6e-2 (≤ 2 ulp: the reference rounds the update to the
  grad's dtype before adding, the kernel rounds once after);
* fp8 pre-pass values: equal to torch's e4m3 conversion (GPU), ≥ 90% equal under the
  interpreter, whose e4m3 rounding is wrong when it carries into the exponent.

Also here, on CPU: every kernel compiles to sm_90 PTX (``triton.compile``, no GPU
needed), and ``bench/gpu_table.py --small`` runs end to end.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# First: sets TRITON_INTERPRET=1 (no CUDA) before anything imports triton.
from tests.triton_interpreter import (  # noqa: F401  (fresh_process_guard is an autouse fixture)
    CUDA,
    DEV,
    K,
    fresh_process_guard,
    gen,
    needs_cuda,
    rand_omega,
    randn,
    rerun_in_fresh_process,
)

# isort: split
import mas_local
from mas_local import ops
from mas_local.ops import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PRECISIONS = ["exact", "accurate", "fast"]
FP8 = CUDA and K.fp8.unavailable_reason(DEV) is None


def test_in_fresh_process():
    rerun_in_fresh_process(__file__)


def tolerance(dtype, precision):
    """Largest |Ω − Ω_exact| allowed, as a fraction of α Σ|a·b| (see the module docstring)."""
    if precision == "fast" and dtype == torch.float32:
        return 2.0**-7 if CUDA else 2.0**-6
    if not CUDA:
        return 1e-5
    if dtype != torch.float32:
        return 1e-4
    return 1e-5 if precision == "exact" else 2.0**-9


def assert_within_bound(got, want, bound, tol):
    """|got − want| ≤ tol · bound + tiny, elementwise (bound = α Σ|a·b| per element)."""
    err = (got - want).abs()
    limit = tol * bound + 1e-6 * bound.max()
    worst = (err / limit.clamp_min(1e-30)).max().item()
    assert worst <= 1.0, f"error {err.max().item():.3g} exceeds {tol:.3g}·Σ|a·b| (worst ratio {worst:.3g})"


def abs_gemm_bound(a, b, alpha):
    return alpha * a.double().abs().t() @ b.double().abs()


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

# In the timed GPU check (bench/gpu_check.sh) fewer shapes: every new shape compiles new kernel variants.
QUICK = CUDA and os.environ.get("MAS_LOCAL_GPU_CHECK") == "1"
GEMM_SHAPES = [(1, 1, 1), (1, 17, 5), (37, 21, 45), (64, 32, 16), (33, 1, 19)]  # (R, out, in)
GEMM_SHAPES = GEMM_SHAPES[1:3] if QUICK else GEMM_SHAPES


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GEMM_SHAPES)
def test_abs_gemm_matches_reference(shape, dtype, precision):
    if precision == "fast" and FP8:
        pytest.skip("fp8 on this GPU: checked by test_gpu_abs_gemm_fast_fp8 (Frobenius bound)")
    r, m, n = shape
    a, b = randn(r, m, dtype=dtype, seed=2), randn(r, n, dtype=dtype, seed=3)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.37, "exact")
    got = omega.clone()
    ops.abs_gemm_acc_(got, a, b, 0.37, backend="triton", precision=precision)
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 0.37), tolerance(dtype, precision))


@pytest.mark.parametrize("dtypes", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_abs_gemm_mixed_dtypes_are_not_rounded(dtypes):
    """fp16 next to bf16 (or a 16-bit next to an fp32 operand) is computed in fp32: nothing rounds to bf16."""
    a, b = randn(29, 11, dtype=dtypes[0], seed=60), randn(29, 13, dtype=dtypes[1], seed=61)
    omega = rand_omega(11, 13)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0, "exact")
    got = omega.clone()
    ops.abs_gemm_acc_(got, a, b, 1.0, backend="triton", precision="exact")
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 1.0), tolerance(torch.float32, "exact"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_abs_gemm_strided_and_transposed_views(dtype):
    r, m, n = 29, 23, 18
    a = randn(m, r, dtype=dtype, seed=4).t()  # [R, out] with strides (1, R)
    b = randn(r, 2 * n + 1, dtype=dtype, seed=5)[:, 1::2]  # column stride 2, offset 1
    assert not a.is_contiguous() and not b.is_contiguous()
    omega_big = rand_omega(n, m).t()  # a transposed Ω view
    want = omega_big.clone()
    reference.abs_gemm_acc_(want, a, b, 1.5, "exact")
    got = omega_big.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.5, "accurate")
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 1.5), tolerance(dtype, "accurate"))


def test_abs_gemm_empty_rows_is_a_no_op():
    omega = rand_omega(3, 4)
    got = omega.clone()
    K.abs_gemm_acc_(got, randn(0, 3), randn(0, 4), 1.0, "accurate")
    assert torch.equal(got, omega)


def test_abs_gemm_chunks_rows_within_the_scratch_bound(monkeypatch):
    monkeypatch.setattr(K.abs_gemm, "SCRATCH_BYTES", 8 * (7 + 5) * 4)  # 8 rows per chunk → 256-row floor
    assert K.abs_gemm.row_chunks(600, (7 + 5) * 4) == [(0, 256), (256, 512), (512, 600)]
    r, m, n = 600, 7, 5
    a, b = randn(r, m, seed=8), randn(r, n, seed=9)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0, "exact")
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0, "exact")
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 1.0), tolerance(torch.float32, "exact"))


def test_abs_copy_is_exact_bitwise():
    a = randn(13, 9, dtype=torch.bfloat16, seed=10)[:, ::2]
    b = randn(13, 4, dtype=torch.float16, seed=11)
    da, _ = K.abs_gemm.abs_copy(a, a)
    db, _ = K.abs_gemm.abs_copy(b, b)
    assert da.is_contiguous() and torch.equal(da, a.abs())
    assert torch.equal(db, b.abs())


def test_abs_copy_into_bf16_rounds_once():
    a = randn(11, 9, seed=12)[::2]
    da, _ = K.abs_gemm.abs_copy(a, a, torch.bfloat16)
    assert da.dtype == torch.bfloat16 and da.is_contiguous()
    if CUDA:  # round to nearest even, like torch
        assert torch.equal(da, a.abs().bfloat16())
    else:  # the interpreter truncates: within one bf16 ulp
        torch.testing.assert_close(da.float(), a.abs(), rtol=2.0**-7, atol=0)


def test_fp8_prepass_layout_and_scales():
    """The "fast" pre-pass: exact per-tensor scales, K-major e4m3 copies of |x|·448/amax, zero padding."""
    a = randn(37, 21, dtype=torch.bfloat16, seed=58)
    b = randn(74, 45, dtype=torch.bfloat16, seed=59)[::2] * 3  # row stride 2·45
    a8, b8, s_a, s_b = K.fp8.prepass(a, b)
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
PS_SHAPES = PS_SHAPES[1:3] if QUICK else PS_SHAPES


def per_sample_bound(a, b, alpha):
    return alpha * a.reshape(-1, a.shape[2]).double().abs().t() @ b.reshape(-1, b.shape[2]).double().abs()


def check_per_sample(a, b, alpha, precision, run, dtype=None):
    omega = rand_omega(a.shape[2], b.shape[2])
    want = omega.clone()
    reference.per_sample_abs_acc_(want, a, b, alpha, "exact")
    got = omega.clone()
    run(got)
    tol = tolerance(dtype or a.dtype, precision)
    assert_within_bound(got.double(), want.double(), per_sample_bound(a, b, alpha), tol)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PS_SHAPES)
def test_per_sample_matches_reference(shape, dtype, split):
    nb, t, m, n = shape
    a, b = randn(nb, t, m, dtype=dtype, seed=12), randn(nb, t, n, dtype=dtype, seed=13)
    run = lambda o: K.per_sample_abs.per_sample_abs_acc_(o, a, b, 0.25, "accurate", split=split)
    check_per_sample(a, b, 0.25, "accurate", run)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_precisions_through_public_op(dtype, precision):
    a, b = randn(3, 37, 20, dtype=dtype, seed=14), randn(3, 37, 18, dtype=dtype, seed=15)
    run = lambda o: ops.per_sample_abs_acc_(o, a, b, 0.5, backend="triton", precision=precision)
    check_per_sample(a, b, 0.5, precision, run)


def test_per_sample_mixed_dtypes_are_not_rounded():
    a, b = randn(2, 9, 7, dtype=torch.float16, seed=16), randn(2, 9, 6, dtype=torch.bfloat16, seed=17)
    run = lambda o: ops.per_sample_abs_acc_(o, a, b, 1.0, backend="triton", precision="exact")
    check_per_sample(a, b, 1.0, "exact", run, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_strided_views(dtype):
    nb, t, m, n = 3, 11, 13, 10
    a = randn(t, nb, m, dtype=dtype, seed=18).transpose(0, 1)  # [B, T, out], batch not outermost
    b = randn(nb, n, t, dtype=dtype, seed=19).transpose(1, 2)  # [B, T, in], in-stride T
    run = lambda o: ops.per_sample_abs_acc_(o, a, b, 1.0, backend="triton")
    check_per_sample(a, b, 1.0, "accurate", run)


def test_per_sample_split_is_deterministic():
    a, b = randn(6, 9, 20, seed=20), randn(6, 9, 12, seed=21)
    omega = rand_omega(20, 12)
    outs = []
    for _ in range(2):
        got = omega.clone()
        K.per_sample_abs.per_sample_abs_acc_(got, a, b, 1.0, split=3)
        outs.append(got)
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- penalty

PEN_SHAPES = [(300,), (5, 7), (1,), (128,), (129,), (3, 4, 5), (0,)]
GRAD_RTOL = {torch.float64: 1e-7, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def penalty_case(pdtype, odtype, shapes=PEN_SHAPES, seed=20, unaligned=False):
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
        omegas.append(torch.rand(*s, generator=gen(seed + 4 * i + 2)).to(DEV, odtype))
        grads.append(randn(*s, dtype=pdtype, seed=seed + 4 * i + 3))
    return grads, params, anchors, omegas


def check_penalty(case, lam, run):
    grads, params, anchors, omegas = case
    want_g = [g.clone() for g in grads]
    want = reference.penalty_grad_(want_g, params, anchors, omegas, lam)
    got_g = [g.clone() for g in grads]
    got = run(got_g, params, anchors, omegas, lam)
    assert got.dtype == torch.float32 and got.dim() == 0 and got.device.type == DEV.type
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for gg, wg in zip(got_g, want_g):
        rtol = GRAD_RTOL[gg.dtype]
        torch.testing.assert_close(gg.float(), wg.float(), rtol=rtol, atol=rtol)
    return got


@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pdtype", DTYPES)
def test_penalty_matches_reference(pdtype, odtype):
    check_penalty(penalty_case(pdtype, odtype), 0.7, K.penalty_grad_)


def test_penalty_mixed_groups_and_unaligned_tensors():
    grads, params, anchors, omegas = penalty_case(torch.float32, torch.float32)
    g2, p2, a2, o2 = penalty_case(torch.bfloat16, torch.bfloat16, shapes=[(70,), (2, 65)], seed=60)
    g3, p3, a3, o3 = penalty_case(torch.float32, torch.bfloat16, shapes=[(257,), (6,)], seed=80, unaligned=True)
    case = (grads[:3] + g2 + g3, params[:3] + p2 + p3, anchors[:3] + a2 + a3, omegas[:3] + o2 + o3)
    check_penalty(case, 1.3, K.penalty_grad_)


def test_penalty_through_public_op_and_empty_list():
    check_penalty(penalty_case(torch.float32, torch.float32), 2.0, lambda *args: ops.penalty_grad_(*args, "triton"))
    assert ops.penalty_grad_([], [], [], [], 1.0, backend="triton").item() == 0.0


def test_penalty_value_is_bit_identical_between_runs():
    grads, params, anchors, omegas = penalty_case(torch.float32, torch.float32, shapes=[(1000,), (33, 31), (7,)])
    values = [K.penalty_grad_([g.clone() for g in grads], params, anchors, omegas, 0.9) for _ in range(3)]
    assert all(torch.equal(v, values[0]) for v in values[1:])


def test_penalty_float64_tensor_runs_the_reference_for_that_tensor_only():
    grads, params, anchors, omegas = penalty_case(torch.float32, torch.float32, shapes=[(300,), (5, 3), (7,)])
    grads[1], params[1], anchors[1] = grads[1].double(), params[1].double(), anchors[1].double()
    check_penalty((grads, params, anchors, omegas), 0.3, K.penalty_grad_)
    alone = penalty_case(torch.float32, torch.float32, shapes=[(5, 3)])
    alone = tuple([t.double() for t in ts] if i < 3 else ts for i, ts in enumerate(alone))
    want_g = [g.clone() for g in alone[0]]
    want = reference.penalty_grad_(want_g, *alone[1:], 0.3)
    got_g = [g.clone() for g in alone[0]]
    got = K.penalty_grad_(got_g, *alone[1:], 0.3)
    assert torch.equal(got, want) and all(torch.equal(x, y) for x, y in zip(got_g, want_g))


def test_float64_operands_run_the_reference():
    a, b = randn(9, 4, dtype=torch.float64, seed=54), randn(9, 5, dtype=torch.float64, seed=55)
    omega = rand_omega(4, 5)
    want, got = omega.clone(), omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.5, "exact")
    ops.abs_gemm_acc_(got, a, b, 0.5, backend="triton", precision="exact")
    assert torch.equal(got, want)
    a3, b3 = randn(2, 3, 4, dtype=torch.float64, seed=56), randn(2, 3, 5, dtype=torch.float64, seed=57)
    want, got = omega.clone(), omega.clone()
    reference.per_sample_abs_acc_(want, a3, b3, 0.5)
    ops.per_sample_abs_acc_(got, a3, b3, 0.5, backend="triton")
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- bench/designs (timed by the GPU table)


@pytest.mark.parametrize("design", ["fused", "prepass_triton", "prepass_overlap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_abs_gemm_designs_match_reference(design, dtype):
    from bench.designs import abs_gemm_fused, abs_gemm_prepass

    fn = {
        "fused": abs_gemm_fused.abs_gemm_fused,
        "prepass_triton": abs_gemm_prepass.prepass_triton,
        "prepass_overlap": abs_gemm_prepass.prepass_overlap,
    }[design]
    a, b = randn(37, 21, dtype=dtype, seed=70), randn(37, 18, dtype=dtype, seed=71)
    omega = rand_omega(21, 18)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 0.5, "exact")
    got = omega.clone()
    fn(got, a, b, 0.5, "accurate")
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 0.5), tolerance(dtype, "accurate"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bench_per_sample_nested_design_matches_reference(dtype):
    from bench.designs.per_sample_nested import per_sample_nested

    a, b = randn(3, 19, 21, dtype=dtype, seed=72), randn(3, 19, 17, dtype=dtype, seed=73)
    check_per_sample(a, b, 0.5, "accurate", lambda o: per_sample_nested(o, a, b, 0.5, "accurate"))


# --------------------------------------------------------------------------- GPU only


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["exact", "accurate"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_abs_gemm_tensor_cores(dtype, precision):
    r, m, n = 1000, 384, 520
    a, b = randn(r, m, dtype=dtype, seed=30), randn(r, n, dtype=dtype, seed=31)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / r, "exact")
    got = omega.clone()
    K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0 / r, precision)
    assert_within_bound(got.double(), want.double(), abs_gemm_bound(a, b, 1.0 / r), tolerance(dtype, precision))


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(4096, 256, 384), (4090, 200, 136)])
def test_gpu_abs_gemm_fast_fp8(shape):
    if not FP8:
        pytest.skip(f"no fp8 here ({K.fp8.unavailable_reason(DEV)}): 'fast' rounds to bf16, tested above")
    r, m, n = shape
    a, b = randn(r, m, dtype=torch.bfloat16, seed=32), randn(r, n, dtype=torch.bfloat16, seed=33)
    omega = rand_omega(m, n)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / r, "exact")
    got = omega.clone()
    K.abs_gemm_acc_(got, a, b, 1.0 / r, "fast")
    rel = ((got - want).norm() / (want - omega).norm()).item()
    assert rel <= 1e-2, rel


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_per_sample_auto_split(dtype):
    nb, t, m, n = 8, 130, 256, 200  # few tiles: choose_split picks > 1
    a, b = randn(nb, t, m, dtype=dtype, seed=34), randn(nb, t, n, dtype=dtype, seed=35)
    assert K.per_sample_abs.choose_split(rand_omega(m, n), nb) > 1
    run = lambda o: K.per_sample_abs.per_sample_abs_acc_(o, a, b, 0.5)
    check_per_sample(a, b, 0.5, "accurate", run)


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16])
def test_gpu_penalty_large_and_deterministic(odtype):
    shapes = [(1024, 1000), (70001,), (3,), (512, 129)]
    case = penalty_case(torch.float32, odtype, shapes=shapes, seed=40)
    first = check_penalty(case, 0.5, K.penalty_grad_)
    for _ in range(3):
        again = K.penalty_grad_([g.clone() for g in case[0]], *case[1:], 0.5)
        assert torch.equal(again, first)


# --------------------------------------------------------------------------- sm_90 compilation (no GPU needed)

_SM90_CHECK = r"""
import sys
import triton
from mas_local.kernels import abs_gemm as ag, fp8 as f8, launch, per_sample_abs as ps, penalty as pen
try:
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
except Exception as exc:
    print("SKIP: no NVIDIA Triton backend:", exc)
    sys.exit(0)

assert not launch.INTERPRET
TARGET = GPUTarget("cuda", 90, 32)
SMEM_MAX = 232448  # bytes of shared memory a block may use on sm_90


def ptx(fn, types, consts, div16=(), num_warps=4, num_stages=3):
    # PTX for sm_90 with the specialisations a real launch on aligned, contiguous data gets.
    sig = {n: ("constexpr" if n in consts else types[n]) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    src = triton.compiler.ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    kernel = triton.compile(src, target=TARGET, options=opts)
    assert kernel.metadata.shared <= SMEM_MAX, (fn.__name__, consts, kernel.metadata.shared)
    return kernel.asm["ptx"]


def gemm(elem, precision, fp8=False):
    size = {"*bf16": 2, "*fp32": 4, "*fp8e4nv": 1}[elem]
    cfg = launch.fitting_configs(ag._GPU_FP8_CONFIGS if fp8 else ag._GPU_CONFIGS, size)[0]  # untuned choice
    types = dict(omega_ptr="*fp32", a_ptr=elem, b_ptr=elem, scale_a_ptr="*fp32", scale_b_ptr="*fp32", n_out="i32",
                 n_in="i32", n_rows="i32", rows_bucket="i32", a_stride_row="i32", a_stride_out="i32",
                 b_stride_row="i32", b_stride_in="i32", o_stride_out="i32", o_stride_in="i32", alpha="fp32")
    # pre-pass copies are row-major [R, ·]; the fp8 copies are K-major [·, R16]
    unit = dict(a_stride_row=1, b_stride_row=1, o_stride_in=1) if fp8 else dict(a_stride_out=1, b_stride_in=1,
                                                                                 o_stride_in=1)
    consts = dict(UPCAST=False, SCALED=fp8, PRECISION=precision, **unit, **cfg.kwargs)
    div = [n for n in types if n not in consts and n not in ("alpha", "rows_bucket")]
    return ptx(ag._gemm_kernel, types, consts, div, cfg.num_warps, cfg.num_stages)


for elem, prec in (("*bf16", "tf32"), ("*fp32", "tf32")):
    code = gemm(elem, prec)
    assert "wgmma.mma_async" in code and "cp.async" in code, (elem, prec)
code = gemm("*fp32", "ieee")
assert "wgmma" not in code  # "exact": IEEE fp32 FMAs, never TF32
code = gemm("*fp8e4nv", "tf32", fp8=True)
assert "wgmma.mma_async" in code and "e4m3" in code

for elem, accum, prec, to_bf16 in (("*bf16", True, "tf32", False), ("*bf16", False, "tf32", False),
                                   ("*fp32", True, "tf32", False), ("*fp32", True, "tf32", True),
                                   ("*fp32", True, "ieee", False)):
    cfg = launch.fitting_configs(ps._GPU_CONFIGS, 2 if elem == "*bf16" else 4)[0]
    types = dict(out_ptr="*fp32", a_ptr=elem, b_ptr=elem, n_samples="i32", seq_len="i32", seq_bucket="i32",
                 n_out="i32", n_in="i32", per_split="i32", a_stride_sample="i32", a_stride_seq="i32",
                 b_stride_sample="i32", b_stride_seq="i32", out_stride_split="i32", out_stride_out="i32",
                 alpha="fp32")
    consts = dict(a_stride_out=1, b_stride_in=1, out_stride_in=1, ACCUM=accum, UPCAST=False, TO_BF16=to_bf16,
                  PRECISION=prec, **cfg.kwargs)
    div = ("out_ptr", "a_ptr", "b_ptr", "seq_len", "n_out", "n_in", "a_stride_sample", "a_stride_seq",
           "b_stride_sample", "b_stride_seq", "out_stride_split", "out_stride_out")
    code = ptx(ps._per_sample_kernel, types, consts, div, cfg.num_warps, cfg.num_stages)
    if prec == "ieee":
        assert "wgmma" not in code
    else:
        assert "wgmma.mma_async" in code and "cp.async" in code, (elem, accum, to_bf16)
ptx(ps._reduce_partials_kernel, dict(omega_ptr="*fp32", part_ptr="*fp32", numel="i32", n_split="i32",
                                     alpha="fp32"), dict(BLOCK=1024), ("omega_ptr", "part_ptr", "numel"))

types = dict(a_ptr="*i16", da_ptr="*i16", a_rows="i32", a_cols="i32", a_row_stride="i32", b_ptr="*i16", db_ptr="*i16",
             b_rows="i32", b_cols="i32", b_row_stride="i32", tiles_a="i32")
copy_consts = dict(a_col_stride=1, b_col_stride=1, SIGN_MASK=0x7FFF, BITWISE=True, BLOCK_ROWS=64, BLOCK_COLS=128)
copy_div = ("a_ptr", "da_ptr", "a_cols", "a_row_stride", "b_ptr", "db_ptr", "b_cols", "b_row_stride")
code = ptx(ag._abs_copy_kernel, types, copy_consts, copy_div)
assert "ld.global.v4" in code and "st.global.v4" in code
types.update(a_ptr="*fp32", b_ptr="*fp32", da_ptr="*bf16", db_ptr="*bf16")
ptx(ag._abs_copy_kernel, types, dict(copy_consts, SIGN_MASK=0, BITWISE=False), copy_div)
types = dict(a_ptr="*bf16", a_rows="i32", a_cols="i32", a_row_stride="i32", b_ptr="*bf16", b_rows="i32", b_cols="i32",
             b_row_stride="i32", tiles_a="i32", amax_ptr="*i32")
code = ptx(f8._amax_kernel, types, dict(a_col_stride=1, b_col_stride=1, BLOCK_ROWS=64, BLOCK_COLS=64),
           ("a_ptr", "b_ptr", "a_cols", "a_row_stride", "b_cols", "b_row_stride"))
assert "atom" in code
types = dict(a_ptr="*bf16", da_ptr="*fp8e4nv", a_cols="i32", a_row_stride="i32", b_ptr="*bf16", db_ptr="*fp8e4nv",
             b_cols="i32", b_row_stride="i32", rows="i32", rows_pad="i32", tiles_a="i32", amax_ptr="*i32",
             scale_ptr="*fp32")
ptx(f8._cast_kernel, types, dict(a_col_stride=1, b_col_stride=1, BLOCK_ROWS=64, BLOCK_COLS=64),
    ("a_ptr", "b_ptr", "da_ptr", "db_ptr", "a_cols", "b_cols", "a_row_stride", "b_row_stride", "rows_pad"))

for pdt, odt in (("fp32", "fp32"), ("fp32", "bf16"), ("bf16", "bf16"), ("fp16", "fp32")):
    al = {"fp32": 4, "bf16": 8, "fp16": 8}
    types = dict(g_base="*" + pdt, p_base="*" + pdt, a_base="*" + pdt, o_base="*" + odt, table_ptr="*i64",
                 grad_off_ptr="*i64", part_ptr="*fp64", two_lam="fp32")
    consts = dict(ALIGN_GRAD=al[pdt], ALIGN_PARAM=al[pdt], ALIGN_ANCHOR=al[pdt], ALIGN_OMEGA=al[odt], BLOCK=2048,
                  ITERS=32)
    div = ("g_base", "p_base", "a_base", "o_base", "table_ptr", "grad_off_ptr")
    code = ptx(pen._penalty_kernel, types, consts, div, 8)
    assert "ld.global.v4" in code and "st.global.v4" in code, (pdt, odt)
ptx(pen._final_sum_kernel, dict(part_ptr="*fp64", n="i32", lam="fp32", out_ptr="*fp32"), dict(BLOCK=1024))
print("OK")
"""


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
