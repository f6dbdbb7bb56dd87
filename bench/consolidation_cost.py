"""What a consolidation costs, as a multiple of the passes it is made of (CPU, one run, min of interleaved repeats).

Prints the table of docs/performance.md: local hebbian ÷ forward, global sample ÷ forward+backward of Σ‖f‖²,
the per-sample autograd loop ÷ global sample (with both peak memories: the C heap sampled after every aten op,
glibc's ``mallinfo2``), and consolidation ÷ forward on tiny models. OpenMP threads should not spin on a shared
machine: the script sets ``OMP_WAIT_POLICY=passive`` unless it is set.
Run: ``python bench/consolidation_cost.py [--repeats 5] [--threads 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts its OpenMP runtime

import platform
import subprocess
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mas_local as ml  # noqa: E402
from bench import models  # noqa: E402

_LIBC = ctypes.CDLL("libc.so.6")


def _out(model, batch):
    y = model(**batch) if isinstance(batch, dict) else model(batch)
    return y.logits if hasattr(y, "logits") else y


def forward(model, data):
    with torch.no_grad():
        for b in data:
            _out(model, b)


def forward_backward(model, data):
    for b in data:
        loss = _out(model, b).float().pow(2).sum()
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def per_sample_loop(model, data):
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for b in data:
        for k in range(b.shape[0]):
            grads = torch.autograd.grad(_out(model, b[k : k + 1]).pow(2).sum(), params)
            for a, g in zip(acc, grads):
                a.add_(g.abs())


def consolidation(mode, estimator, **kw):
    def run(model, data):
        ml.compute_importance(model, data, mode=mode, estimator=estimator, progress=False, **kw)

    return run


def first_batch_only(fn):
    """``fn`` on the first batch alone: a pass minus it leaves the cost of the later batches."""
    return lambda model, data: fn(model, data[:1])


def best(fns: dict, model, data, repeats: int) -> dict[str, float]:
    """Min over ``repeats`` rounds, the functions interleaved within each round (after one warm-up each)."""
    for fn in fns.values():
        fn(model, data)
    times = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(model, data)
            times[name] = min(times[name], time.perf_counter() - t)
    return times


class _MallInfo(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_LIBC.mallinfo2.restype = _MallInfo


def _heap_bytes() -> int:
    """Bytes allocated from the C heap now (glibc ``mallinfo2``: small blocks + mmapped blocks)."""
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakHeap(TorchDispatchMode):
    """Samples the C heap after every aten op: the peak above the level at entry, in bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.base, self.peak = _heap_bytes(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _heap_bytes() - self.base)
        return out


def peak_mib(fn, model, data) -> float:
    """Peak extra memory of ``fn(model, data)`` (after one warm-up run), in MiB."""
    fn(model, data)
    with _PeakHeap() as probe:
        fn(model, data)
    return probe.peak / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    def add(model_name, what, num, den, target, later=None):
        """``later``: the same ratio over the batches after the first, as (num_pass, num_first, den_pass, n)."""
        steady = ""
        if later is not None:
            num_pass, num_first, den_pass, n = later
            steady = f"{((num_pass - num_first) / (n - 1)) / (den_pass / n):.2f}×"
        rows.append((model_name, what, num / den, steady, target))

    for name, build in (("Llama h128 ×2, 4×8×64 tokens", models.llama), ("GPT-2 h128 ×2, 4×8×64", models.gpt2)):
        model, data = build()
        n = len(data)
        t = best(
            {
                "fwd": forward,
                "fwdbwd": forward_backward,
                "hebbian": consolidation("local", "hebbian"),
                "hebbian1": first_batch_only(consolidation("local", "hebbian")),
                "hebbian_fast": consolidation("local", "hebbian", precision="fast"),
                "sample": consolidation("global", "sample"),
                "sample1": first_batch_only(consolidation("global", "sample")),
            },
            model,
            data,
            args.repeats,
        )
        add(
            name, "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 2.2", (t["hebbian"], t["hebbian1"], t["fwd"], n)
        )
        add(name, 'local hebbian, precision="fast" ÷ forward', t["hebbian_fast"], t["fwd"], "≤ 1.6")
        add(
            name,
            "global sample ÷ forward+backward",
            t["sample"],
            t["fwdbwd"],
            "≤ 1.3",
            (t["sample"], t["sample1"], t["fwdbwd"], n),
        )
    model, data = models.resnet()
    n = len(data)
    t = best(
        {
            "fwd": forward,
            "fwdbwd": forward_backward,
            "hebbian": consolidation("local", "hebbian"),
            "hebbian1": first_batch_only(consolidation("local", "hebbian")),
            "sample": consolidation("global", "sample"),
            "sample1": first_batch_only(consolidation("global", "sample")),
        },
        model,
        data,
        args.repeats,
    )
    name = "ResNet CNN (BN, in-place ReLU), 4×[16,3,32,32]"
    add(name, "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 2.5", (t["hebbian"], t["hebbian1"], t["fwd"], n))
    add(
        name,
        "global sample ÷ forward+backward",
        t["sample"],
        t["fwdbwd"],
        "≤ 2.0",
        (t["sample"], t["sample1"], t["fwdbwd"], n),
    )
    model, data = models.token_mlp()
    name = "token MLP [32,128,256] 256→1024→256"
    t = best(
        {
            "loop": per_sample_loop,
            "sample": consolidation("global", "sample"),
            "micro": consolidation("global", "sample", micro_batch=4),
        },
        model,
        data,
        args.repeats,
    )
    loop_mib = peak_mib(per_sample_loop, model, data)
    sample_mib = peak_mib(consolidation("global", "sample"), model, data)
    micro_mib = peak_mib(consolidation("global", "sample", micro_batch=4), model, data)
    add(name, "per-sample loop ÷ global sample", t["loop"], t["sample"], "≥ 1.3")
    add(
        name,
        f"peak extra memory, global sample ÷ loop ({sample_mib:.0f} / {loop_mib:.0f} MiB)",
        sample_mib,
        max(loop_mib, 1e-9),
        "≤ 2",
    )
    add(name, "per-sample loop ÷ global sample, micro_batch=4", t["loop"], t["micro"], "≥ 1.3")
    add(
        name,
        f"peak extra memory, micro_batch=4 ÷ loop ({micro_mib:.0f} / {loop_mib:.0f} MiB)",
        micro_mib,
        max(loop_mib, 1e-9),
        "≤ 2",
    )
    for name, build in (("tiny MLP 32→64→10, 4×16", models.tiny_mlp), ("tiny Llama h64 ×1, 4×4×16", models.tiny_llama)):
        model, data = build()
        n = len(data)
        t = best(
            {
                "fwd": forward,
                "sample": consolidation("global", "sample"),
                "sample1": first_batch_only(consolidation("global", "sample")),
                "hebbian": consolidation("local", "hebbian"),
                "hebbian1": first_batch_only(consolidation("local", "hebbian")),
            },
            model,
            data,
            args.repeats,
        )
        add(name, "global sample ÷ forward", t["sample"], t["fwd"], "≤ 4", (t["sample"], t["sample1"], t["fwd"], n))
        add(name, "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 4", (t["hebbian"], t["hebbian1"], t["fwd"], n))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Consolidation cost ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}, commit {commit}, "
        f"min of {args.repeats} interleaved repeats)",
        "",
        "The pass ratio is the target's; the batches after the first (pass minus a one-batch pass, per batch) show",
        "what the first batch's planning (usage probe, recognition checks) adds to a four-batch pass.",
        "",
        "| model | ratio | pass | batches after the first | target |",
        "|---|---|---|---|---|",
    ] + [f"| {m} | {w} | {r:.2f}× | {st} | {tg} |" for m, w, r, st, tg in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
