"""The rows, timing and markdown of the GPU table (``bench/gpu_table.py``).

Every row is printed as it is measured and, when the table has an output file, the
whole table so far is rewritten to it at once: a run cut short by its deadline still
leaves a complete table of what it measured.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback

import torch

from bench.timing import git_commit

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = ["work", "impl", "ms", "rate", "naive", "ref", "mem", "check", "note"]


class Table:
    """Rows and notes of one run; ``out_path`` receives the markdown after every row."""

    def __init__(self, out_path: str | None = None, small: bool = False):
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.out_path = out_path
        self.small = small

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
            self.flush()

    def row(
        self, work, impl, ms, *, work_amount=None, unit="TFLOP/s", naive=None, ref=None, mem=None, check="", note=""
    ):
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
        self.rows.append(r)
        print(" | ".join(str(v) for v in r.values()), flush=True)
        self.flush()

    def failed(self, work, impl, exc) -> None:
        traceback.print_exc()
        self.row(work, impl, None, check="FAILED", note=f"{type(exc).__name__}: {str(exc)[:80]}")

    def bad(self) -> bool:
        return any(r["check"].startswith(("BAD", "FAILED")) for r in self.rows)

    def markdown(self) -> str:
        dev = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter; timings meaningless)"
        head = [
            f"# mas-local GPU table{' (--small smoke run)' if self.small else ''}",
            "",
            f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
            f"- device: {dev}",
            f"- torch {torch.__version__}, triton {_triton_version()}, commit {git_commit()}",
            "- ms: median; × naive / × ref: time ratio (lower is faster); extra MiB: peak allocation of one call",
            "",
            "| work | implementation | ms | rate | × naive | × ref | extra MiB | check | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in r.values()) + " |" for r in self.rows]
        notes = [""] + [f"- {n}" for n in self.notes]
        return "\n".join(head + body + notes) + "\n"

    def flush(self) -> None:
        if self.out_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.out_path)), exist_ok=True)
            tmp = self.out_path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(self.markdown())
            os.replace(tmp, self.out_path)  # never a half-written table


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn`` (``triton.testing.do_bench``, ~60 ms of repetitions, on CUDA).

    Without CUDA (the ``--small`` smoke run, kernels interpreted) one call is timed:
    the number only shows that the row ran.
    """
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


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


def bound_err(got, want, bound) -> float:
    """Largest |got − want| as a fraction of the element's Σ|a·b| (``bound``): the precision contract."""
    err = (got.double() - want.double()).abs()
    return (err / (bound + 1e-6 * bound.max()).clamp_min(1e-30)).max().item()


def fro_err(got, want, before):
    return ((got - want).norm() / (want - before).norm().clamp_min(1e-30)).item()


def randn(*shape, dtype, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)


def rand_omega(*shape, seed=99):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.rand(*shape, generator=g, device=DEV) + 0.5


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "absent"
