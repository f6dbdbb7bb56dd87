#!/usr/bin/env python3
"""Side-by-side GPU table for the sizes of DESIGN.md §5, in one run.

For each piece of work it times, on the same inputs: the naive torch code a user
writes today, the plain cuBLAS/cuDNN reference point, and every backend that can
run it through the public ops (``backend="triton"``; ``backend="ext"`` when the
extension is built), plus the Triton abs-GEMM designs one by one. Each fast
result is first checked against :mod:`mas_local.reference` on the same inputs
(outputs poisoned/pre-filled with random values before the launch). Times are
medians (``triton.testing.do_bench`` on CUDA); extra memory is the peak of
``torch.cuda.max_memory_allocated`` over one call, outside the timing loop.

    python3 bench/gpu_table.py [--out FILE] [--only abs,fp32,sample,conv,penalty]
    python3 bench/gpu_table.py --small      # tiny sizes: smoke test on CPU under TRITON_INTERPRET=1

The markdown table (date, device, git commit) is printed last.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
import traceback

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = os.path.dirname(os.path.abspath(__file__))
try:
    import mas_local  # noqa: F401  (installed: the copy with its kernels)
except ImportError:
    sys.path.insert(0, os.path.dirname(HERE))

import mas_local  # noqa: E402
from mas_local import ops  # noqa: E402
from mas_local.ops import backend as mbackend  # noqa: E402
from mas_local.ops import reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
COPY_TBPS = 4.27  # DESIGN.md §4: measured device copy bandwidth (read+write), TB/s
ROWS: list[dict] = []
NOTES: list[str] = []
OUT_PATH: str | None = None
SMALL = False


# --------------------------------------------------------------------------- helpers


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn, reps: int = 5) -> float:
    """Median milliseconds of ``fn``."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extra_mib(fn) -> float | None:
    """Peak device memory that one call of ``fn`` allocates beyond what was live before it."""
    if not CUDA:
        return None
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(got, want, before):
    """Largest error relative to the largest entry of the exact increment."""
    inc = (want - before).abs().max().item()
    return (got - want).abs().max().item() / max(inc, 1e-30)


def fro_err(got, want, before):
    return ((got - want).norm() / (want - before).norm().clamp_min(1e-30)).item()


def backends_here() -> list[str]:
    names = ["triton"]
    if mbackend.unavailable_reason("ext", DEV) is None:
        names.append("ext")
    out = []
    for name in names:
        reason = mbackend.unavailable_reason(name, DEV)
        if reason is None:
            out.append(name)
        elif f"backend {name!r} not measured: {reason}" not in NOTES:
            NOTES.append(f"backend {name!r} not measured: {reason}")
    return out


def row(work, impl, ms, *, work_amount=None, unit="TFLOP/s", naive=None, ref=None, mem=None, check="", note=""):
    rate = ""
    if work_amount is not None and ms and ms > 0:
        scale = 1e12 if unit == "TFLOP/s" else 1e9
        rate = f"{work_amount / (ms * 1e-3) / scale:.1f} {unit}"
    r = dict(
        work=work,
        impl=impl,
        ms=f"{ms:.3f}" if ms is not None else "—",
        rate=rate,
        naive=f"{ms / naive:.2f}×" if ms and naive else "",
        ref=f"{ms / ref:.2f}×" if ms and ref else "",
        mem=f"{mem:.0f}" if mem is not None else "",
        check=check,
        note=note,
    )
    ROWS.append(r)
    print(" | ".join(str(v) for v in r.values()), flush=True)
    if OUT_PATH:  # the table so far survives a timeout later in the run
        _write(OUT_PATH, table(SMALL))


def failed(work, impl, exc):
    traceback.print_exc()
    row(work, impl, None, check="FAILED", note=f"{type(exc).__name__}: {str(exc)[:80]}")


def randn(*shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)


def rand_omega(*shape, seed=99):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.rand(*shape, generator=g, device=DEV) + 0.5


# --------------------------------------------------------------------------- abs-GEMM


def abs_gemm_section(n, out_f, in_f, dtype, label, precisions):
    y = randn(n, out_f, dtype=dtype, seed=1)
    x = randn(n, in_f, dtype=dtype, seed=2)
    flops = 2.0 * n * out_f * in_f
    omega = rand_omega(out_f, in_f)
    work = f"abs-GEMM {label}"

    def naive():
        omega.add_(y.abs().T @ x.abs() / n)

    def plain():
        return y.T @ x

    t_naive = bench_ms(naive)
    row(work, "naive `Ω += |Y|ᵀ|X|/N`", t_naive, work_amount=flops, naive=t_naive, note="torch default flags")
    t_ref = bench_ms(plain)
    row(work, "plain `Yᵀ X` (cuBLAS)", t_ref, work_amount=flops, naive=t_naive, ref=t_ref)

    before = rand_omega(out_f, in_f, seed=5)
    want = before.clone()
    reference.abs_gemm_acc_(want, y, x, 1.0 / n)

    def run_variant(impl, call, precision):
        try:
            got = before.clone()
            call(got)
            sync()
            if precision == "fast":
                err = fro_err(got, want, before)
                check = f"{'ok' if err <= 1e-2 else 'BAD'} fro {err:.1e}"
            else:
                err = rel_err(got, want, before)
                lim = 1e-2 if (precision == "accurate" and dtype == torch.float32) else 1e-3
                check = f"{'ok' if err <= lim else 'BAD'} {err:.1e}"
            target = omega.clone()
            t = bench_ms(lambda: call(target))
            row(work, impl, t, work_amount=flops, naive=t_naive, ref=t_ref, check=check)
        except Exception as exc:  # noqa: BLE001 - one failed row must not end the table
            failed(work, impl, exc)

    for be in backends_here():
        for precision in precisions:
            run_variant(
                f"{be} {precision}",
                lambda o, be=be, p=precision: ops.abs_gemm_acc_(o, y, x, 1.0 / n, backend=be, precision=p),
                precision,
            )
    if "triton" in backends_here():
        from mas_local.kernels import abs_gemm as kag

        for design in ("fused", "prepass", "prepass-triton", "prepass-overlap"):
            run_variant(
                f"triton accurate design={design}",
                lambda o, d=design: kag.abs_gemm_acc_(o, y, x, 1.0 / n, "accurate", design=d),
                "accurate",
            )
        # The pre-passes alone (bytes: read the operands, write the copies), to split the totals.
        moved = (y.numel() + x.numel()) * y.element_size() * 2
        try:
            t = bench_ms(lambda: kag.abs_copy(y, x))
            row(work, "  abs pre-pass alone", t, work_amount=moved, unit="GB/s", naive=t_naive, ref=t_ref)
        except Exception as exc:  # noqa: BLE001
            failed(work, "  abs pre-pass alone", exc)
        if kag._fp8_capable(DEV):
            moved8 = (y.numel() + x.numel()) * (2 * y.element_size() + 1)
            try:
                t = bench_ms(lambda: kag.fp8_prepass(y, x))
                row(work, "  fp8 pre-pass alone (amax + cast)", t, work_amount=moved8, unit="GB/s", naive=t_naive,
                    ref=t_ref)
            except Exception as exc:  # noqa: BLE001
                failed(work, "  fp8 pre-pass alone", exc)


# --------------------------------------------------------------------------- per-sample


def per_sample_section(nb, t, in_f, out_f, dtype):
    a = randn(nb, t, out_f, dtype=dtype, seed=3)  # output-side (Δ)
    b = randn(nb, t, in_f, dtype=dtype, seed=4)  # input-side (X)
    flops = 2.0 * nb * t * out_f * in_f
    omega = rand_omega(out_f, in_f)
    work = f"per-sample [{nb},{t},{in_f}]→{out_f} {str(dtype).replace('torch.', '')}"

    def naive():
        omega.add_(torch.einsum("bto,bti->boi", a, b).float().abs().sum(0))

    def plain():
        return a.reshape(-1, out_f).T @ b.reshape(-1, in_f)

    t_naive = bench_ms(naive)
    row(work, "naive einsum+abs+sum", t_naive, work_amount=flops, naive=t_naive, mem=extra_mib(naive))
    t_ref = bench_ms(plain)
    row(work, "batch-gradient GEMM (cuBLAS)", t_ref, work_amount=flops, naive=t_naive, ref=t_ref, mem=extra_mib(plain))

    before = rand_omega(out_f, in_f, seed=6)
    want = before.clone()
    reference.per_sample_abs_acc_(want, a, b, 1.0)
    variants = [(be, lambda o, be=be: ops.per_sample_abs_acc_(o, a, b, 1.0, backend=be)) for be in backends_here()]
    if "triton" in backends_here():
        from mas_local.kernels import per_sample_abs as kps

        variants.append(("triton loop=nested", lambda o: kps.per_sample_abs_acc_(o, a, b, 1.0, loop="nested")))
    for impl, call in variants:
        try:
            got = before.clone()
            call(got)
            sync()
            err = rel_err(got, want, before)
            lim = 1e-2 if dtype == torch.float32 else 1e-3
            fn = lambda call=call: call(omega)
            t = bench_ms(fn)
            row(work, impl, t, work_amount=flops, naive=t_naive, ref=t_ref, mem=extra_mib(fn),
                check=f"{'ok' if err <= lim else 'BAD'} {err:.1e}")
        except Exception as exc:  # noqa: BLE001
            failed(work, impl, exc)


# --------------------------------------------------------------------------- Hebbian conv


def conv_section(n, c, hw, dtype):
    from torch.nn.grad import conv2d_weight

    x = randn(n, c, hw, hw, dtype=dtype, seed=7)
    w = randn(c, c, 3, 3, dtype=dtype, seed=8) * 0.05
    y = torch.nn.functional.conv2d(x, w, padding=1)
    r = n * hw * hw
    flops = 2.0 * n * c * c * 9 * hw * hw
    omega = rand_omega(c, c, 3, 3)
    work = f"Hebbian Conv2d {c}→{c} 3×3 [{n},{c},{hw},{hw}] {str(dtype).replace('torch.', '')}"

    def naive():
        omega.add_(conv2d_weight(x.abs(), w.shape, y.abs(), padding=1) / r)

    t_naive = bench_ms(naive)
    row(work, "naive conv2d_weight(|x|,…,|y|)/R", t_naive, work_amount=flops, naive=t_naive)
    t_wg = bench_ms(lambda: conv2d_weight(x, w.shape, y, padding=1))
    row(work, "cuDNN weight-grad (same shape)", t_wg, work_amount=flops, naive=t_naive, ref=t_wg)
    t_fwd = bench_ms(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    row(work, "conv forward", t_fwd, work_amount=flops, naive=t_naive, ref=t_wg, note="no custom kernel for this op")


# --------------------------------------------------------------------------- penalty


def penalty_section(n_tensors, side, odtype, lam=0.5):
    shape = (side, side)
    params = [randn(*shape, dtype=torch.float32, seed=100 + i) for i in range(n_tensors)]
    anchors = [p + 0.01 * randn(*shape, dtype=torch.float32, seed=300 + i) for i, p in enumerate(params)]
    omegas = [torch.rand(shape, device=DEV).to(odtype) for _ in range(n_tensors)]
    grads = [randn(*shape, dtype=torch.float32, seed=500 + i) for i in range(n_tensors)]
    numel = n_tensors * side * side
    es_o = omegas[0].element_size()
    nbytes = numel * (4 + 4 + 4 + 4 + es_o)  # grad read+write, θ, θ*, Ω
    floor_ms = nbytes / (COPY_TBPS * 1e12) * 1e3
    work = f"penalty {numel / 1e9:.2f} G fp32 params, {str(odtype).replace('torch.', '')} Ω ({nbytes // numel} B/param)"

    row(work, f"byte floor at {COPY_TBPS} TB/s", floor_ms, work_amount=nbytes, unit="GB/s", ref=floor_ms,
        note=f"{nbytes // numel} B/param: grad read+write, θ, θ*, Ω")
    if es_o == 2:  # the issue states 16 B/param for a bf16 Ω; show that floor too
        row(work, "byte floor as stated in issue 4 (16 B/param)", numel * 16 / (COPY_TBPS * 1e12) * 1e3,
            work_amount=numel * 16, unit="GB/s", ref=floor_ms)
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
        row(work, "autograd", t_naive, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms)
        leaves.clear()  # free their grads before the next baselines
        del leaves

        def foreach():
            d = torch._foreach_sub(params, anchors)
            w = torch._foreach_mul(d, omegas)
            torch._foreach_add_(grads, w, alpha=2 * lam)
            v = torch._foreach_mul(w, d)
            return torch.stack(torch._foreach_norm(v, 1)).sum() * lam  # Ω ≥ 0: L1 norm = sum

        t = bench_ms(foreach)
        row(work, "torch._foreach", t, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms)

    check_n = min(n_tensors, 4)
    for be in backends_here():
        try:
            g_ref = [g.clone() for g in grads[:check_n]]
            want = reference.penalty_grad_(g_ref, params[:check_n], anchors[:check_n], omegas[:check_n], lam)
            g_got = [g.clone() for g in grads[:check_n]]
            got = ops.penalty_grad_(g_got, params[:check_n], anchors[:check_n], omegas[:check_n], lam, backend=be)
            again = ops.penalty_grad_([g.clone() for g in grads[:check_n]], params[:check_n], anchors[:check_n],
                                      omegas[:check_n], lam, backend=be)
            v_err = abs(got.item() - want.item()) / max(abs(want.item()), 1e-30)
            g_err = max(((x - w).abs().max() / w.abs().max()).item() for x, w in zip(g_got, g_ref))
            ok = v_err <= 1e-5 and g_err <= 1e-5 and torch.equal(got, again)
            fn = lambda be=be: ops.penalty_grad_(grads, params, anchors, omegas, lam, backend=be)
            t = bench_ms(fn)
            row(work, be, t, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms,
                check=f"{'ok' if ok else 'BAD'} val {v_err:.0e} grad {g_err:.0e} det {torch.equal(got, again)}")
        except Exception as exc:  # noqa: BLE001
            failed(work, be, exc)

    if CUDA:  # last: compiling can take a while, and the rows above are written already
        def step(g, p, a, o):
            d = p - a
            w = o.float() * d
            g.add_(w * (2 * lam))
            return (w * d).sum()

        def whole(gs, ps, as_, os_):
            return torch.stack([step(g, p, a, o) for g, p, a, o in zip(gs, ps, as_, os_)]).sum() * lam

        whole_ok = False
        try:  # the whole list in one compiled graph (what DESIGN.md's 8.14 ms measured)
            t0 = time.perf_counter()
            cwhole = torch.compile(whole, dynamic=False)
            cwhole(grads, params, anchors, omegas)
            sync()
            took = time.perf_counter() - t0
            t = bench_ms(lambda: cwhole(grads, params, anchors, omegas))
            row(work, "torch.compile (whole list)", t, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms,
                note=f"compile {took:.0f} s")
            whole_ok = True
        except Exception as exc:  # noqa: BLE001
            failed(work, "torch.compile (whole list)", exc)
        try:
            if whole_ok:  # the per-tensor form only as a fallback: compiling costs bench time
                return
            cstep = torch.compile(step, dynamic=False)

            def per_tensor():
                return torch.stack([cstep(g, p, a, o) for g, p, a, o in zip(grads, params, anchors, omegas)]).sum()

            per_tensor()
            t = bench_ms(per_tensor)
            row(work, "torch.compile (per tensor)", t, work_amount=nbytes, unit="GB/s", naive=t_naive, ref=floor_ms,
                note="one launch per tensor")
        except Exception as exc:  # noqa: BLE001
            failed(work, "torch.compile (per tensor)", exc)


def copy_bandwidth(nbytes):
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).uniform_()
    dst = torch.empty_like(src)
    t = bench_ms(lambda: dst.copy_(src))
    NOTES.append(f"measured copy bandwidth this run: {2 * nbytes / (t * 1e-3) / 1e12:.2f} TB/s (read+write)")


# --------------------------------------------------------------------------- table


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
        if out.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain"], cwd=HERE, capture_output=True, text=True)
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    return os.environ.get("MAS_LOCAL_COMMIT", "unknown (no git)")


def table(small: bool) -> str:
    dev = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter; timings meaningless)"
    head = [
        f"# mas-local GPU table{' (--small smoke run)' if small else ''}",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- device: {dev}",
        f"- torch {torch.__version__}, triton {_triton_version()}, commit {git_commit()}",
        "- ms: median; × naive / × ref: time ratio (lower is faster); extra MiB: peak allocation of one call",
        "",
        "| work | implementation | ms | rate | × naive | × ref | extra MiB | check | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in r.values()) + " |" for r in ROWS]
    notes = [""] + [f"- {n}" for n in NOTES]
    return "\n".join(head + body + notes) + "\n"


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--only", default="abs,fp32,sample,conv,penalty", help="comma list of sections")
    args = ap.parse_args(argv)
    if not CUDA and not args.small:
        print("no CUDA device: use --small for a CPU smoke test", file=sys.stderr)
        return 2
    global OUT_PATH, SMALL
    OUT_PATH, SMALL = args.out, args.small
    only = set(args.only.split(","))
    torch.manual_seed(0)
    print(f"mas_local {mas_local.__version__} on {DEV}; backends: {backends_here()}", flush=True)
    s = args.small
    sections = [
        ("abs", lambda: abs_gemm_section(*((64, 24, 40) if s else (16384, 4096, 4096)), torch.bfloat16,
                                         "N=16384, 4096×4096 bf16" if not s else "small bf16",
                                         ("accurate", "fast"))),
        ("fp32", lambda: abs_gemm_section(*((64, 24, 40) if s else (16384, 4096, 4096)), torch.float32,
                                          "N=16384, 4096×4096 fp32" if not s else "small fp32",
                                          ("accurate", "exact"))),
        ("sample", lambda: per_sample_section(*((2, 16, 24, 20) if s else (32, 512, 2048, 2048)), torch.bfloat16)),
        ("conv", lambda: conv_section(*((2, 8, 6) if s else (64, 256, 28)), torch.bfloat16)),
        ("penalty", lambda: [
            copy_bandwidth(1 << 20 if s else 4 << 30),
            penalty_section(*((3, 40) if s else (91, 4096)), torch.float32),
            penalty_section(*((3, 40) if s else (91, 4096)), torch.bfloat16),
        ]),
    ]
    for name, fn in sections:
        if name not in only:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            failed(name, "section", exc)
        if CUDA:
            torch.cuda.empty_cache()
        if args.out:  # a partial table survives a timeout in a later section
            _write(args.out, table(args.small))
    text = table(args.small)
    print("\n" + text)
    if args.out:
        _write(args.out, text)
    return 1 if any(r["check"].startswith(("BAD", "FAILED")) for r in ROWS) else 0


if __name__ == "__main__":
    sys.exit(main())
