"""Where the small models' consolidation time goes: torch profiler tables for the ratios that miss their
targets in ``bench/consolidation_cost.py`` (Llama local hebbian ÷ forward, Llama global sample ÷
forward+backward, CNN local hebbian ÷ forward, token MLP per-sample loop ÷ global sample).

Each case profiles the consolidation of one batch after its first (the plan made, the self-check done: the
per-batch cost the pass repeats) and its yardstick on the same batch, and prints the top operators by self
CPU time, with their totals, and the unprofiled wall time. The profiler slows every op and counts the autograd
engine's thread beside the caller's, so compare the shares within a table and the wall times between tables.

    python bench/profile_small.py [--threads 2] [--rows 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import models  # noqa: E402
from bench.consolidation_cost import forward, forward_backward, per_sample_loop  # noqa: E402
from bench.timing import emit, header  # noqa: E402
from mas_local.config import ImportanceConfig  # noqa: E402
from mas_local.importance.estimator import Estimator  # noqa: E402


def _steady(model, data, mode: str, estimator: str):
    """A function consolidating ``data[1]`` with an estimator that already planned and checked on ``data[0]``."""
    est = Estimator(model, config=ImportanceConfig(mode=mode, estimator=estimator, progress=False))
    est.update(data[0])
    return lambda: est.update(data[1])


def _table(fn, rows: int) -> tuple[float, float, str]:
    fn()  # warm-up
    wall = float("inf")
    for _ in range(5):  # without the profiler: its own overhead would count as the pass's
        start = time.perf_counter()
        fn()
        wall = min(wall, time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e3
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    lines = ["| op | calls | self ms | share |", "|---|---|---|---|"]
    for e in top:
        ms = e.self_cpu_time_total / 1e3
        lines.append(f"| `{e.key}` | {e.count} | {ms:.2f} | {100 * ms / total:.0f}% |")
    ops = sum(e.count for e in events)
    lines.append(f"| all ops | {ops} | {total:.2f} | 100% |")
    return wall * 1e3, total, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    llama, llama_data = models.llama()
    cnn, cnn_data = models.resnet()
    mlp, mlp_data = models.token_mlp(data=(2, 32, 128))
    cases = [
        ("Llama h128 ×2, [8, 64]: local hebbian", _steady(llama, llama_data, "local", "hebbian")),
        ("Llama: its forward", lambda: forward(llama, llama_data[1:2])),
        ("Llama: global sample", _steady(llama, llama_data, "global", "sample")),
        ("Llama: its forward+backward of Σ‖f‖²", lambda: forward_backward(llama, llama_data[1:2])),
        ("ResNet CNN, [16, 3, 32, 32]: local hebbian", _steady(cnn, cnn_data, "local", "hebbian")),
        ("ResNet CNN: its forward", lambda: forward(cnn, cnn_data[1:2])),
        ("token MLP [32, 128, 256]: global sample", _steady(mlp, mlp_data, "global", "sample")),
        ("token MLP: the per-sample loop", lambda: per_sample_loop(mlp, mlp_data[1:2])),
    ]
    out = [header("Profiles of the small models' consolidations", "torch.profiler, CPU, self time per op"), ""]
    for title, fn in cases:
        wall, total, table = _table(fn, args.rows)
        out += [
            f"## {title}: {wall:.1f} ms per run unprofiled (min of 5); {total:.1f} ms of op self time profiled",
            "",
            table,
            "",
        ]
        print(out[-4], file=sys.stderr, flush=True)
    emit("\n".join(out), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
