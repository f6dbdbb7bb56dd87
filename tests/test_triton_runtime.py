"""The Triton backend's launch plumbing, shown on CPU through the interpreter: autotune keys and
their buckets, the penalty's table caches, CUDA-graph capture rules, per-tensor layouts, NaN
propagation in the fp8 path, the scratch bound of the fp8 path, the cuBLAS path selection,
and the device guard of every entry point.

Tolerances: interpreted kernels compute in fp32 after upcasting (1e-5 of the increment);
the fp8 path under the interpreter: relative Frobenius error ≤ 5e-2 (the interpreter's
e4m3 rounding is wrong when it carries into the exponent; on a GPU the bound is 1e-2).
"""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch

# First: sets TRITON_INTERPRET=1 (no CUDA) before anything imports triton.
from tests.triton_interpreter import (  # noqa: F401  (fresh_process_guard is an autouse fixture)
    CUDA,
    DEV,
    K,
    assert_acc_close,
    fresh_process_guard,
    rand_omega,
    randn,
    rerun_in_fresh_process,
)

# isort: split
import triton

from mas_local import ops
from mas_local.ops import reference

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")
cpu_only = pytest.mark.skipif(CUDA, reason="exercises the interpreter's CPU path; the GPU has its own tests")


def test_in_fresh_process():
    rerun_in_fresh_process(__file__)


# --------------------------------------------------------------------------- autotune keys


def test_size_bucket_is_the_next_power_of_two():
    assert [K.launch.size_bucket(n) for n in (0, 1, 16, 17, 100, 128, 129, 5000)] == [
        16,
        16,
        16,
        32,
        128,
        128,
        256,
        8192,
    ]


class CountingBench:
    """A CPU ``do_bench`` for the real Triton autotuner: runs the trial once, counts it."""

    def __init__(self):
        self.trials = 0

    def __call__(self, fn, quantiles=None):
        self.trials += 1
        fn()
        return [1.0 + self.trials * 1e-3] * 3


def _two_configs(cfg):
    return [cfg, triton.Config(dict(cfg.kwargs, BLOCK_K=32), num_warps=4, num_stages=1)]


@cpu_only
def test_abs_gemm_tunes_once_per_row_bucket(monkeypatch):
    bench = CountingBench()
    tuned = K.launch.TunedKernel(
        K.abs_gemm._gemm_kernel,
        _two_configs(K.abs_gemm.INTERPRET_CONFIG),
        K.abs_gemm.GEMM_KEY,
        ["omega_ptr"],
        "a_ptr",
        None,
        autotune=True,
        do_bench=bench,
    )
    monkeypatch.setattr(K.abs_gemm, "GEMM", tuned)
    trials = []
    for rows in (100, 120, 128, 200):  # buckets 128, 128, 128, 256
        a, b = randn(rows, 9, seed=rows), randn(rows, 7, seed=rows + 1)
        omega = rand_omega(9, 7)
        want = omega.clone()
        reference.abs_gemm_acc_(want, a, b, 0.5, "exact")
        got = omega.clone()
        K.abs_gemm.abs_gemm_acc_(got, a, b, 0.5, "exact")
        assert_acc_close(got, omega, want, 1e-5)  # Ω restored between the timed trials
        trials.append(bench.trials)
    assert trials == [2, 2, 2, 4]  # two configs timed per new bucket, none for a size in a known bucket
    assert sorted(key[2] for key in tuned.tuner.cache) == [128, 256]


@cpu_only
def test_per_sample_tunes_once_per_sequence_bucket(monkeypatch):
    bench = CountingBench()
    ps = K.per_sample_abs
    tuned = K.launch.TunedKernel(
        ps._per_sample_kernel,
        _two_configs(ps.INTERPRET_CONFIG),
        ps.KEY,
        ["out_ptr"],
        "a_ptr",
        None,
        autotune=True,
        do_bench=bench,
    )
    monkeypatch.setattr(ps, "KERNEL", tuned)
    trials = []
    for seq in (20, 31, 40):  # buckets 32, 32, 64
        a, b = randn(3, seq, 10, seed=seq), randn(3, seq, 6, seed=seq + 1)
        omega = rand_omega(10, 6)
        want = omega.clone()
        reference.per_sample_abs_acc_(want, a, b, 1.0, "exact")
        got = omega.clone()
        ps.per_sample_abs_acc_(got, a, b, 1.0, "exact")
        assert_acc_close(got, omega, want, 1e-5)
        trials.append(bench.trials)
    assert trials == [2, 2, 4]


@cpu_only
def test_untuned_launch_under_capture_uses_the_first_config_without_timing(monkeypatch, caplog):
    bench = CountingBench()
    tuned = K.launch.TunedKernel(
        K.abs_gemm._gemm_kernel,
        _two_configs(K.abs_gemm.INTERPRET_CONFIG),
        K.abs_gemm.GEMM_KEY,
        ["omega_ptr"],
        "a_ptr",
        None,
        autotune=True,
        do_bench=bench,
    )
    monkeypatch.setattr(K.abs_gemm, "GEMM", tuned)
    monkeypatch.setattr(K.launch, "capturing", lambda device: True)
    a, b = randn(50, 9, seed=3), randn(50, 7, seed=4)
    before = rand_omega(9, 7)
    want = before.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0, "exact")
    got = before.clone()
    with caplog.at_level(logging.INFO, logger="mas_local"):
        K.abs_gemm.abs_gemm_acc_(got, a, b, 1.0, "exact")
    assert bench.trials == 0
    assert any("CUDA-graph capture" in r.getMessage() for r in caplog.records)
    assert_acc_close(got, before, want, 1e-5)


# --------------------------------------------------------------------------- penalty caches and capture


def _penalty_tensors(shapes, seed=0, dtype=torch.float32):
    mk = lambda s, k: randn(*s, dtype=dtype, seed=seed + k)
    params = [mk(s, 10 * i) for i, s in enumerate(shapes)]
    anchors = [mk(s, 10 * i + 1) for i, s in enumerate(shapes)]
    omegas = [mk(s, 10 * i + 2).abs().float() for i, s in enumerate(shapes)]
    return params, anchors, omegas


def _check_against_reference(grads, params, anchors, omegas, lam):
    g_ref = [g.clone() for g in grads]
    want = reference.penalty_grad_(g_ref, params, anchors, omegas, lam)
    got = K.penalty_grad_(grads, params, anchors, omegas, lam)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    return got


def test_penalty_new_grads_each_step_rebuild_only_the_grad_offsets(monkeypatch):
    """zero_grad(set_to_none=True) gives new grads every step: the chunk table stays, one small array is uploaded."""
    uploads = []
    real_upload = K.penalty._upload
    monkeypatch.setattr(
        K.penalty, "_upload", lambda rows, device: uploads.append(len(rows)) or real_upload(rows, device)
    )
    monkeypatch.setattr(K.penalty, "_tables", type(K.penalty._tables)())
    monkeypatch.setattr(K.penalty, "_grad_offsets", type(K.penalty._grad_offsets)())
    shapes = [(300,), (5, 7), (129,)]
    params, anchors, omegas = _penalty_tensors(shapes)
    kept = []  # keep each step's grads alive, so that new grads get new addresses
    for step in range(3):
        grads = [randn(*s, seed=100 + 10 * step + i) for i, s in enumerate(shapes)]
        kept.append(grads)
        _check_against_reference(grads, params, anchors, omegas, 0.6)
        table = next(iter(K.penalty._tables.values()))
        if step == 0:
            first_table = table
        assert table is first_table and len(K.penalty._tables) == 1
    chunks = sum(triton.cdiv(s[0] if len(s) == 1 else s[0] * s[1], K.penalty.CHUNK) for s in shapes)
    assert uploads == [chunks, 3, 3, 3]  # the table once, then one offset per tensor per step


def test_penalty_capture_needs_a_warm_up_with_the_same_tensors(monkeypatch):
    monkeypatch.setattr(K.penalty, "_tables", type(K.penalty._tables)())
    monkeypatch.setattr(K.penalty, "_grad_offsets", type(K.penalty._grad_offsets)())
    monkeypatch.setattr(K.penalty, "_captured", [])
    params, anchors, omegas = _penalty_tensors([(200,), (3, 9)], seed=5)
    grads = [randn(*p.shape, seed=7 + i) for i, p in enumerate(params)]
    with monkeypatch.context() as m:
        m.setattr(K.launch, "capturing", lambda device: True)
        m.setattr(K.penalty, "capturing", lambda device: True)
        with pytest.raises(RuntimeError, match="CUDA-graph capture.*warm-up"):
            K.penalty_grad_([g.clone() for g in grads], params, anchors, omegas, 0.5)
    _check_against_reference(grads, params, anchors, omegas, 0.5)  # the warm-up, with the same tensors
    with monkeypatch.context() as m:
        m.setattr(K.launch, "capturing", lambda device: True)
        m.setattr(K.penalty, "capturing", lambda device: True)
        _check_against_reference(grads, params, anchors, omegas, 0.5)
        assert len(K.penalty._captured) == 2  # the chunk table and the grad offsets: kept alive for the graph


# --------------------------------------------------------------------------- penalty layouts


def _channels_last(*shape, seed):
    return randn(*shape, seed=seed).contiguous(memory_format=torch.channels_last)


def test_penalty_channels_last_tensors_are_walked_without_copies():
    s = (3, 4, 5, 6)
    g, p, a, o = (_channels_last(*s, seed=k) for k in range(4))
    o = o.abs()
    walked = K.penalty.walkable(g, p, a, o)
    assert all(x is y for x, y in zip(walked[:4], (g, p, a, o))) and walked[4] is None
    ptr = g.data_ptr()
    _check_against_reference([g], [p], [a], [o], 0.9)
    assert g.data_ptr() == ptr and g.is_contiguous(memory_format=torch.channels_last)


def test_penalty_mismatched_omega_layout_is_copied_for_that_tensor_only():
    s = (3, 4, 5, 6)
    g, p, a = (_channels_last(*s, seed=10 + k) for k in range(3))
    o = randn(*s, seed=13).abs()  # contiguous Ω next to channels_last parameters
    walked = K.penalty.walkable(g, p, a, o)
    assert walked[0] is g and walked[1] is p and walked[2] is a and walked[4] is None
    assert walked[3] is not o and walked[3].stride() == g.stride() and torch.equal(walked[3], o)
    other = [randn(50, seed=20 + k) for k in range(4)]
    _check_against_reference([g, other[0]], [p, other[1]], [a, other[2]], [o, other[3].abs()], 0.4)


def test_penalty_non_dense_grad_is_written_back():
    big = randn(6, 16, seed=30)
    g = big[:, ::2]  # a strided view: not dense
    assert not K.penalty.dense(g)
    p, a = randn(6, 8, seed=31), randn(6, 8, seed=32)
    o = randn(6, 8, seed=33).abs()
    untouched = big[:, 1::2].clone()
    _check_against_reference([g], [p], [a], [o], 1.1)
    assert torch.equal(big[:, 1::2], untouched)


def test_penalty_value_does_not_depend_on_alignment_or_grouping():
    """The same data at 16-byte aligned and misaligned addresses (another alignment group) give one value."""
    shapes = [(1000,), (33, 31), (7,)]
    params, anchors, omegas = _penalty_tensors(shapes, seed=40)
    grads = [randn(*s, seed=50 + i) for i, s in enumerate(shapes)]

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view

    aligned = K.penalty_grad_([g.clone() for g in grads], params, anchors, omegas, 0.7)
    moved_params = [shifted(params[0])] + params[1:]  # one tensor changes alignment group
    moved = K.penalty_grad_([shifted(g) for g in grads], moved_params, anchors, omegas, 0.7)
    assert torch.equal(aligned, moved)


# --------------------------------------------------------------------------- NaN and the fp8 path


def test_fp8_prepass_a_nan_operand_gives_a_nan_scale():
    a = randn(40, 17, dtype=torch.bfloat16, seed=60)
    a[7, 3] = float("nan")
    b = randn(40, 9, dtype=torch.bfloat16, seed=61)
    _, _, s_a, s_b = K.fp8.prepass(a, b)
    assert torch.isnan(s_a).all() and torch.isfinite(s_b).all()
    assert torch.equal(s_b.reshape(()), b.float().abs().max() / 448.0)


def test_abs_gemm_nan_propagates_to_its_row_of_omega():
    a, b = randn(30, 6, seed=62), randn(30, 5, seed=63)
    a[4, 2] = float("nan")
    omega = rand_omega(6, 5)
    K.abs_gemm_acc_(omega, a, b, 1.0, "accurate")
    assert torch.isnan(omega[2]).all() and torch.isfinite(omega[[0, 1, 3, 4, 5]]).all()


@cpu_only
def test_fp8_path_chunks_rows_and_propagates_nan(monkeypatch):
    """The fp8 path, run through the interpreter: R is cut so the e4m3 copies stay within SCRATCH_BYTES
    (per-chunk scales), and a NaN operand makes Ω NaN instead of a finite wrong value."""
    monkeypatch.setattr(K.fp8, "unavailable_reason", lambda device: None)
    monkeypatch.setattr(K.fp8, "scaled_mm_works", lambda device: False)  # the Triton fp8 GEMM
    monkeypatch.setattr(K.abs_gemm, "SCRATCH_BYTES", 300 * (8 + 6))  # 256-row chunks
    rows_seen = []
    real = K.fp8.prepass
    monkeypatch.setattr(K.fp8, "prepass", lambda a, b: rows_seen.append(a.shape[0]) or real(a, b))
    a, b = randn(600, 8, seed=64), randn(600, 6, seed=65)
    omega = rand_omega(8, 6)
    want = omega.clone()
    reference.abs_gemm_acc_(want, a, b, 1.0 / 600, "exact")
    got = omega.clone()
    ops.abs_gemm_acc_(got, a, b, 1.0 / 600, backend="triton", precision="fast")
    assert rows_seen == [256, 256, 88]
    assert ((got - want).norm() / (want - omega).norm()).item() <= 5e-2
    b[500, 3] = float("nan")
    ops.abs_gemm_acc_(got, a, b, 1.0 / 600, backend="triton", precision="fast")
    assert torch.isnan(got).all()  # the NaN chunk's scale multiplies every element


# --------------------------------------------------------------------------- cuBLAS path selection


@cpu_only
def test_cublas_path_falls_back_explicitly_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(K.abs_gemm, "_cublas_paths", {})
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="mas_local"):
        assert K.abs_gemm.cublas_path(cpu, torch.bfloat16) == "triton"  # neither aten overload exists on CPU
    text = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "addmm.dtype_out" in text and "mm.out_dtype" in text and "Triton GEMM" in text
    caplog.clear()

    def rejects(*args):
        raise RuntimeError("self and mat2 must have the same dtype")

    def mm_then_add(omega, a_t, b, alpha):
        omega.add_(a_t.float() @ b.float(), alpha=alpha)

    monkeypatch.setattr(K.abs_gemm, "_addmm_dtype_out", rejects)
    monkeypatch.setattr(K.abs_gemm, "_mm_out_dtype_add", mm_then_add)
    with caplog.at_level(logging.INFO, logger="mas_local"):
        assert K.abs_gemm.cublas_path(cpu, torch.float16) == "mm.out_dtype"
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "same dtype" in warned[0] and "mm(out_dtype=fp32)" in warned[0]
    monkeypatch.setattr(K.abs_gemm, "_addmm_dtype_out", lambda o, a_t, b, alpha: mm_then_add(o, a_t, b, alpha))
    monkeypatch.setattr(K.abs_gemm, "_cublas_paths", {})
    assert K.abs_gemm.cublas_path(cpu, torch.bfloat16) == "addmm.dtype_out"


# --------------------------------------------------------------------------- device guard


def test_on_device_selects_the_tensors_cuda_device():
    guard = K.launch.on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(K.launch.on_device(torch.device("cpu")), contextlib.nullcontext)


@pytest.mark.parametrize(
    "module,call",
    [
        ("abs_gemm", lambda: K.abs_gemm_acc_(rand_omega(3, 4), randn(5, 3), randn(5, 4), 1.0)),
        ("per_sample_abs", lambda: K.per_sample_abs_acc_(rand_omega(3, 4), randn(2, 5, 3), randn(2, 5, 4), 1.0)),
        ("penalty", lambda: K.penalty_grad_([randn(8)], [randn(8)], [randn(8)], [randn(8).abs()], 1.0)),
    ],
)
def test_every_entry_point_makes_its_tensors_device_current(monkeypatch, module, call):
    seen = []
    monkeypatch.setattr(getattr(K, module), "on_device", lambda d: seen.append(d) or contextlib.nullcontext())
    call()
    assert [d.type for d in seen] == [DEV.type]
    if CUDA:
        assert seen[0].index == torch.cuda.current_device()
