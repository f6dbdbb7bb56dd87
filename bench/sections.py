"""The measured sections of the GPU table: each times the naive torch code, the plain
cuBLAS/cuDNN reference point, and every backend through the public ops, on the same
inputs, after checking each fast result against the exact reference (precision
contract of ``docs/triton.md``: error per element ≤ tol · Σ|a·b|)."""

from __future__ import annotations

import time

import torch

from mas_local import ops
from mas_local.ops import backend as mbackend
from mas_local.ops import reference

from .table import CUDA, DEV, Table, bench_ms, bound_err, extra_mib, fro_err, rand_omega, randn, sync

COPY_TBPS = 4.27  # docs/triton.md: measured device copy bandwidth (read+write), TB/s


def backends_here(t: Table) -> list[str]:
    out = []
    for name in ("triton", "ext"):
        reason = mbackend.unavailable_reason(name, DEV)
        if reason is None:
            out.append(name)
        else:
            t.note(f"backend {name!r} not measured: {reason}")
    return out


def contract_limit(dtype, precision) -> float:
    """The error bound of a precision mode, as a fraction of Σ|a·b| (16-bit operands: exact products)."""
    if precision == "fast":
        return 2.0**-7
    if dtype != torch.float32:
        return 1e-4
    return 1e-5 if precision == "exact" else 2.0**-9


def fp8_here() -> bool:
    try:
        from mas_local.kernels import fp8
    except ImportError:
        return False
    return fp8.unavailable_reason(DEV) is None


def check_and_time(
    t, work, impl, call, before, want, bound, dtype, precision, *, flops, naive, ref, target, fp8=False, with_mem=False
):
    """One row: the result of ``call`` on a copy of ``before`` checked, then ``call(target)`` timed."""
    try:
        got = before.clone()
        call(got)
        sync()
        if fp8:
            err = fro_err(got, want, before)
            check = f"{'ok' if err <= 1e-2 else 'BAD'} fro {err:.1e}"
        else:
            err = bound_err(got, want, bound)
            check = f"{'ok' if err <= contract_limit(dtype, precision) else 'BAD'} {err:.1e}"
        fn = lambda: call(target)
        ms = bench_ms(fn)
        t.row(
            work,
            impl,
            ms,
            work_amount=flops,
            naive=naive,
            ref=ref,
            check=check,
            mem=extra_mib(fn) if with_mem else None,
        )
    except Exception as exc:  # noqa: BLE001 - one failed row must not end the table
        t.failed(work, impl, exc)


# --------------------------------------------------------------------------- abs-GEMM


def abs_gemm_section(t: Table, n, out_f, in_f, dtype, label, precisions):
    y = randn(n, out_f, dtype=dtype, seed=1)
    x = randn(n, in_f, dtype=dtype, seed=2)
    flops = 2.0 * n * out_f * in_f
    omega = rand_omega(out_f, in_f)
    work = f"abs-GEMM {label}"
    t_naive = bench_ms(lambda: omega.add_(y.abs().T @ x.abs() / n))
    t.row(work, "naive `Ω += |Y|ᵀ|X|/N`", t_naive, work_amount=flops, naive=t_naive, note="torch default flags")
    t_ref = bench_ms(lambda: y.T @ x)
    t.row(work, "plain `Yᵀ X` (cuBLAS)", t_ref, work_amount=flops, naive=t_naive, ref=t_ref)

    before = rand_omega(out_f, in_f, seed=5)
    want = before.clone()
    reference.abs_gemm_acc_(want, y, x, 1.0 / n, "exact")
    bound = (want - before).double()
    for be in backends_here(t):
        for precision in precisions:
            call = lambda o, be=be, p=precision: ops.abs_gemm_acc_(o, y, x, 1.0 / n, backend=be, precision=p)
            fp8 = be == "triton" and precision == "fast" and fp8_here()
            check_and_time(
                t,
                work,
                f"{be} {precision}{' (fp8)' if fp8 else ''}",
                call,
                before,
                want,
                bound,
                dtype,
                precision,
                flops=flops,
                naive=t_naive,
                ref=t_ref,
                target=omega,
                fp8=fp8,
            )
    if "triton" in backends_here(t):
        from mas_local.kernels import abs_gemm as kag
        from mas_local.kernels import fp8 as kfp8

        if CUDA and dtype != torch.float32:
            t.note(f"triton abs-GEMM, {dtype} operands: GEMM path {kag.cublas_path(DEV, dtype)!r}")
        moved = (y.numel() + x.numel()) * y.element_size() * 2
        try:
            ms = bench_ms(lambda: kag.abs_copy(y, x))
            t.row(work, "  abs pre-pass alone", ms, work_amount=moved, unit="GB/s", naive=t_naive, ref=t_ref)
        except Exception as exc:  # noqa: BLE001
            t.failed(work, "  abs pre-pass alone", exc)
        if fp8_here():
            moved8 = (y.numel() + x.numel()) * (2 * y.element_size() + 1)
            try:
                ms = bench_ms(lambda: kfp8.prepass(y, x))
                t.row(
                    work,
                    "  fp8 pre-pass alone (amax + cast)",
                    ms,
                    work_amount=moved8,
                    unit="GB/s",
                    naive=t_naive,
                    ref=t_ref,
                )
            except Exception as exc:  # noqa: BLE001
                t.failed(work, "  fp8 pre-pass alone", exc)


# --------------------------------------------------------------------------- per-sample


def per_sample_section(t: Table, nb, seq, in_f, out_f, dtype, precisions=("accurate",)):
    a = randn(nb, seq, out_f, dtype=dtype, seed=3)  # output-side (Δ)
    b = randn(nb, seq, in_f, dtype=dtype, seed=4)  # input-side (X)
    flops = 2.0 * nb * seq * out_f * in_f
    omega = rand_omega(out_f, in_f)
    work = f"per-sample [{nb},{seq},{in_f}]→{out_f} {str(dtype).replace('torch.', '')}"

    def naive():
        omega.add_(torch.einsum("bto,bti->boi", a, b).float().abs().sum(0))

    t_naive = bench_ms(naive)
    t.row(work, "naive einsum+abs+sum", t_naive, work_amount=flops, naive=t_naive, mem=extra_mib(naive))
    plain = lambda: a.reshape(-1, out_f).T @ b.reshape(-1, in_f)
    t_ref = bench_ms(plain)
    t.row(
        work, "batch-gradient GEMM (cuBLAS)", t_ref, work_amount=flops, naive=t_naive, ref=t_ref, mem=extra_mib(plain)
    )
    before = rand_omega(out_f, in_f, seed=6)
    want = before.clone()
    reference.per_sample_abs_acc_(want, a, b, 1.0, "exact")
    bound = a.reshape(-1, out_f).double().abs().t() @ b.reshape(-1, in_f).double().abs()
    for be in backends_here(t):
        for precision in precisions:
            call = lambda o, be=be, p=precision: ops.per_sample_abs_acc_(o, a, b, 1.0, backend=be, precision=p)
            check_and_time(
                t,
                work,
                f"{be} {precision}",
                call,
                before,
                want,
                bound,
                dtype,
                precision,
                flops=flops,
                naive=t_naive,
                ref=t_ref,
                target=omega,
                with_mem=True,
            )


# --------------------------------------------------------------------------- Hebbian conv


def conv_section(t: Table, n, c, hw, dtype):
    from torch.nn.grad import conv2d_weight

    x = randn(n, c, hw, hw, dtype=dtype, seed=7)
    w = randn(c, c, 3, 3, dtype=dtype, seed=8) * 0.05
    y = torch.nn.functional.conv2d(x, w, padding=1)
    r = n * hw * hw
    flops = 2.0 * n * c * c * 9 * hw * hw
    omega = rand_omega(c, c, 3, 3)
    work = f"Hebbian Conv2d {c}→{c} 3×3 [{n},{c},{hw},{hw}] {str(dtype).replace('torch.', '')}"
    t_naive = bench_ms(lambda: omega.add_(conv2d_weight(x.abs(), w.shape, y.abs(), padding=1) / r))
    t.row(work, "naive conv2d_weight(|x|,…,|y|)/R", t_naive, work_amount=flops, naive=t_naive)
    t_wg = bench_ms(lambda: conv2d_weight(x, w.shape, y, padding=1))
    t.row(work, "cuDNN weight-grad (same shape)", t_wg, work_amount=flops, naive=t_naive, ref=t_wg)
    t_fwd = bench_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    t.row(work, "conv forward", t_fwd, work_amount=flops, naive=t_naive, ref=t_wg, note="no custom kernel for this op")


# --------------------------------------------------------------------------- penalty


def penalty_section(t: Table, n_tensors, side, odtype, lam=0.5, compile_baselines=False):
    shape = (side, side)
    params = [randn(*shape, dtype=torch.float32, seed=100 + i) for i in range(n_tensors)]
    anchors = [p + 0.01 * randn(*shape, dtype=torch.float32, seed=300 + i) for i, p in enumerate(params)]
    omegas = [torch.rand(shape, device=DEV).to(odtype) for _ in range(n_tensors)]
    grads = [randn(*shape, dtype=torch.float32, seed=500 + i) for i in range(n_tensors)]
    numel = n_tensors * side * side
    nbytes = numel * (4 + 4 + 4 + 4 + omegas[0].element_size())  # grad read+write, θ, θ*, Ω
    floor_ms = nbytes / (COPY_TBPS * 1e12) * 1e3
    work = f"penalty {numel / 1e9:.2f} G fp32 params, {str(odtype).replace('torch.', '')} Ω ({nbytes // numel} B/param)"
    t.row(
        work,
        f"byte floor at {COPY_TBPS} TB/s",
        floor_ms,
        work_amount=nbytes,
        unit="GB/s",
        ref=floor_ms,
        note=f"{nbytes // numel} B/param: grad read+write, θ, θ*, Ω",
    )
    t_naive = None
    if odtype == torch.float32:
        leaves = [p.clone().requires_grad_(True) for p in params]
        for leaf, g in zip(leaves, grads):
            leaf.grad = g.clone()

        def autograd():
            loss = sum((o * (p - a).pow(2)).sum() for p, a, o in zip(leaves, anchors, omegas)) * lam
            loss.backward()
            return loss

        t_naive = bench_ms(autograd)
        t.row(work, "autograd", t_naive, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms)
        del leaves

        def foreach():
            d = torch._foreach_sub(params, anchors)
            w = torch._foreach_mul(d, omegas)
            torch._foreach_add_(grads, w, alpha=2 * lam)
            v = torch._foreach_mul(w, d)
            return torch.stack(torch._foreach_norm(v, 1)).sum() * lam  # Ω ≥ 0: L1 norm = sum

        ms = bench_ms(foreach)
        t.row(work, "torch._foreach", ms, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms)

    k = min(n_tensors, 4)
    for be in backends_here(t):
        try:
            g_ref = [g.clone() for g in grads[:k]]
            want = reference.penalty_grad_(g_ref, params[:k], anchors[:k], omegas[:k], lam)
            g_got = [g.clone() for g in grads[:k]]
            got = ops.penalty_grad_(g_got, params[:k], anchors[:k], omegas[:k], lam, backend=be)
            again = ops.penalty_grad_(
                [g.clone() for g in grads[:k]], params[:k], anchors[:k], omegas[:k], lam, backend=be
            )
            v_err = abs(got.item() - want.item()) / max(abs(want.item()), 1e-30)
            g_err = max(((x - w).abs().max() / w.abs().max()).item() for x, w in zip(g_got, g_ref))
            ok = v_err <= 1e-5 and g_err <= 1e-5 and torch.equal(got, again)
            ms = bench_ms(lambda be=be: ops.penalty_grad_(grads, params, anchors, omegas, lam, backend=be))
            t.row(
                work,
                be,
                ms,
                work_amount=nbytes,
                unit="GB/s",
                naive=t_naive,
                ref=floor_ms,
                check=f"{'ok' if ok else 'BAD'} val {v_err:.0e} grad {g_err:.0e} det {torch.equal(got, again)}",
            )
        except Exception as exc:  # noqa: BLE001
            t.failed(work, be, exc)
    if CUDA and compile_baselines:  # opt-in (--compile): compiling 2·n_tensors graphs takes minutes

        def whole(gs, ps, as_, os_):
            parts = []
            for g, p, a, o in zip(gs, ps, as_, os_):
                d = p - a
                w = o.float() * d
                g.add_(w * (2 * lam))
                parts.append((w * d).sum())
            return torch.stack(parts).sum() * lam

        try:
            t0 = time.perf_counter()
            cwhole = torch.compile(whole, dynamic=False)
            cwhole(grads, params, anchors, omegas)
            sync()
            took = time.perf_counter() - t0
            ms = bench_ms(lambda: cwhole(grads, params, anchors, omegas))
            t.row(
                work,
                "torch.compile (whole list)",
                ms,
                work_amount=nbytes,
                unit="GB/s",
                naive=t_naive,
                ref=floor_ms,
                note=f"compile {took:.0f} s",
            )
        except Exception as exc:  # noqa: BLE001
            t.failed(work, "torch.compile (whole list)", exc)


def copy_bandwidth(t: Table, nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    t.note(f"measured copy bandwidth this run: {2 * nbytes / (ms * 1e-3) / 1e12:.2f} TB/s (read+write)")


# --------------------------------------------------------------------------- experimental designs


def designs_section(t: Table, small: bool):
    """The designs of ``bench/designs`` next to what the library runs, on the same inputs."""
    from bench.designs.abs_gemm_fused import abs_gemm_fused
    from bench.designs.abs_gemm_prepass import prepass_overlap, prepass_triton
    from bench.designs.per_sample_nested import per_sample_nested
    from mas_local.kernels import abs_gemm_acc_, per_sample_abs_acc_

    n, out_f, in_f = (64, 24, 40) if small else (16384, 4096, 4096)
    y, x = randn(n, out_f, dtype=torch.bfloat16, seed=11), randn(n, in_f, dtype=torch.bfloat16, seed=12)
    before = rand_omega(out_f, in_f, seed=13)
    want = before.clone()
    reference.abs_gemm_acc_(want, y, x, 1.0 / n, "exact")
    bound = (want - before).double()
    flops = 2.0 * n * out_f * in_f
    t_ref = bench_ms(lambda: y.T @ x)
    work = f"designs: abs-GEMM N={n}, {out_f}×{in_f} bf16"
    t.row(work, "plain `Yᵀ X` (cuBLAS)", t_ref, work_amount=flops, ref=t_ref)
    omega = rand_omega(out_f, in_f)
    for impl, fn in (
        ("library (triton)", abs_gemm_acc_),
        ("fused: tl.abs in the GEMM", abs_gemm_fused),
        ("pre-pass + Triton GEMM", prepass_triton),
        ("pre-pass overlapped (side stream)", prepass_overlap),
    ):
        call = lambda o, fn=fn: fn(o, y, x, 1.0 / n, "accurate")
        check_and_time(
            t,
            work,
            impl,
            call,
            before,
            want,
            bound,
            torch.bfloat16,
            "accurate",
            flops=flops,
            naive=None,
            ref=t_ref,
            target=omega,
        )

    nb, seq, in_f, out_f = (2, 16, 24, 20) if small else (32, 512, 2048, 2048)
    a, b = randn(nb, seq, out_f, dtype=torch.bfloat16, seed=14), randn(nb, seq, in_f, dtype=torch.bfloat16, seed=15)
    before = rand_omega(out_f, in_f, seed=16)
    want = before.clone()
    reference.per_sample_abs_acc_(want, a, b, 1.0, "exact")
    bound = a.reshape(-1, out_f).double().abs().t() @ b.reshape(-1, in_f).double().abs()
    flops = 2.0 * nb * seq * out_f * in_f
    t_ref = bench_ms(lambda: a.reshape(-1, out_f).T @ b.reshape(-1, in_f))
    work = f"designs: per-sample [{nb},{seq},{in_f}]→{out_f} bf16"
    t.row(work, "batch-gradient GEMM (cuBLAS)", t_ref, work_amount=flops, ref=t_ref)
    omega = rand_omega(out_f, in_f)
    for impl, fn in (("library (triton, flat loop)", per_sample_abs_acc_), ("nested loop", per_sample_nested)):
        call = lambda o, fn=fn: fn(o, a, b, 1.0, "accurate")
        check_and_time(
            t,
            work,
            impl,
            call,
            before,
            want,
            bound,
            torch.bfloat16,
            "accurate",
            flops=flops,
            naive=None,
            ref=t_ref,
            target=omega,
            with_mem=True,
        )
