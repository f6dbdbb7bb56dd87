"""CPU speed of the compiled extension's kernels against the torch reference, in one run.

    python bench/cpu_ext_speed.py [--repeat N]

Prints, per op and size, the minimum and median wall time of the torch reference
(mas_local.ops.reference) and of backend "ext" (mas_local.ops.ext), and their ratio.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from mas_local.ops import reference

try:
    from mas_local.ops import ext as _ext
except ImportError as exc:  # pragma: no cover - reported, not hidden
    raise SystemExit(f"mas_local._C is not built: {exc}") from exc


def _time_pair(ref_fn, ext_fn, repeat: int) -> tuple[float, float, float, float]:
    """(min, median) ms of each, runs interleaved so that load from other processes hits both alike."""
    ref_fn()  # warm-up
    ext_fn()
    ref_t, ext_t = [], []
    for _ in range(repeat):
        for fn, acc in ((ref_fn, ref_t), (ext_fn, ext_t)):
            t0 = time.perf_counter()
            fn()
            acc.append((time.perf_counter() - t0) * 1e3)
    return min(ref_t), statistics.median(ref_t), min(ext_t), statistics.median(ext_t)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


def _row(name: str, times: tuple[float, float, float, float]) -> None:
    rmin, rmed, emin, emed = times
    ratio = f"{rmin / emin:.2f}x / {rmed / emed:.2f}x"
    print(f"| {name} | {rmin:.2f} / {rmed:.2f} | {emin:.2f} / {emed:.2f} | {ratio} |")


def bench_penalty(total: int, n_tensors: int, pdtype, odtype, repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    size = total // n_tensors
    params = [torch.randn(size, generator=g).to(pdtype) for _ in range(n_tensors)]
    anchors = [torch.randn(size, generator=g).to(pdtype) for _ in range(n_tensors)]
    omegas = [torch.rand(size, generator=g).to(odtype) for _ in range(n_tensors)]
    grads = [torch.randn(size, generator=g).to(pdtype) for _ in range(n_tensors)]
    times = _time_pair(
        lambda: reference.penalty_grad_(grads, params, anchors, omegas, 1.0),
        lambda: _ext.penalty_grad_(grads, params, anchors, omegas, 1.0),
        repeat,
    )
    name = f"penalty {total / 1e6:.0f} M params in {n_tensors} tensors, θ {str(pdtype)[6:]}, Ω {str(odtype)[6:]}"
    _row(name, times)


def bench_per_sample(nb: int, t: int, out: int, inn: int, dtype, repeat: int) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(nb, t, out, generator=g).to(dtype)
    b = torch.randn(nb, t, inn, generator=g).to(dtype)
    omega = torch.rand(out, inn, generator=g)
    times = _time_pair(
        lambda: reference.per_sample_abs_acc_(omega, a, b, 1.0),
        lambda: _ext.per_sample_abs_acc_(omega, a, b, 1.0),
        repeat,
    )
    _row(f"per-sample [{nb},{t},{out}]x[{nb},{t},{inn}] {str(dtype)[6:]}", times)


def bench_abs_gemm(r: int, out: int, inn: int, dtype, repeat: int) -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randn(r, out, generator=g).to(dtype)
    b = torch.randn(r, inn, generator=g).to(dtype)
    omega = torch.rand(out, inn, generator=g)
    times = _time_pair(
        lambda: reference.abs_gemm_acc_(omega, a, b, 1.0), lambda: _ext.abs_gemm_acc_(omega, a, b, 1.0), repeat
    )
    _row(f"abs-GEMM [{r},{out}]x[{r},{inn}] {str(dtype)[6:]}", times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"cpu: {_cpu_name()}, torch threads: {torch.get_num_threads()}, torch {torch.__version__}")
    print(f"commit: {_commit()}")
    print(f"min / median of {args.repeat} interleaved runs after one warm-up each\n")
    print("| work | torch ref ms (min / median) | ext ms (min / median) | speed-up (min / median) |")
    print("|---|---:|---:|---:|")
    r = args.repeat
    bench_penalty(20_000_000, 20, torch.float32, torch.float32, r)
    bench_penalty(20_000_000, 200, torch.float32, torch.float32, r)
    bench_penalty(20_000_000, 20, torch.bfloat16, torch.float32, r)
    bench_penalty(20_000_000, 20, torch.bfloat16, torch.bfloat16, r)
    bench_per_sample(16, 64, 256, 256, torch.float32, r)
    bench_per_sample(16, 64, 256, 256, torch.bfloat16, r)
    bench_per_sample(32, 128, 512, 512, torch.float32, r)
    bench_per_sample(64, 16, 128, 128, torch.float32, r)
    bench_abs_gemm(4096, 1024, 1024, torch.float32, r)
    bench_abs_gemm(4096, 1024, 1024, torch.bfloat16, r)


if __name__ == "__main__":
    main()
