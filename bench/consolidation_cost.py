"""What a consolidation costs, as a multiple of the passes it is made of (CPU, one run, min of interleaved repeats).

Prints the table of docs/performance.md: local hebbian ÷ forward, global sample ÷ forward+backward of Σ‖f‖²,
the per-sample autograd loop ÷ global sample (with both peak memories: the C heap sampled after every aten op,
glibc's ``mallinfo2``), and consolidation ÷ forward on tiny models. OpenMP threads should not spin on a shared
machine: the script sets ``OMP_WAIT_POLICY=passive`` unless it is set.
Run: ``python bench/consolidation_cost.py [--repeats 5] [--threads 2] [--real] [--out FILE]``; ``--real`` adds the
real sizes (GPT-2 124M, a 336M Llama, depth 12/24/48; ``bench/real_size.py``, each run in a fresh process, with
peak memory).
"""

from __future__ import annotations

import argparse
import ctypes
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts its OpenMP runtime

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mas_local as ml  # noqa: E402
from bench import models  # noqa: E402
from bench.timing import best_of, header  # noqa: E402

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
    """Seconds per call of each ``fn(model, data)`` (min of interleaved repeats, ``bench/timing.py``)."""
    return best_of({name: (lambda fn=fn: fn(model, data)) for name, fn in fns.items()}, repeats)


def with_first_batch(**estimators: tuple[str, str]) -> dict:
    """A consolidation per ``key=(mode, estimator)``, and as ``key1`` the same on the first batch alone."""
    fns = {}
    for key, (mode, estimator) in estimators.items():
        fns[key] = consolidation(mode, estimator)
        fns[key + "1"] = first_batch_only(fns[key])
    return fns


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
    ap.add_argument("--real", action="store_true", help="also GPT-2 124M, a 336M Llama and the depth scaling")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    def add(model_name, what, num, den, target):
        rows.append((model_name, what, num / den, "", target))

    def add_pass(model_name, what, t, key, den, n, target):
        """The ratio over the pass, and over the batches after the first (pass minus a one-batch pass)."""
        later = ((t[key] - t[key + "1"]) / (n - 1)) / (t[den] / n)
        rows.append((model_name, what, t[key] / t[den], f"{later:.2f}×", target))

    both = {"hebbian": ("local", "hebbian"), "sample": ("global", "sample")}
    for name, build in (("Llama h128 ×2, 4×8×64 tokens", models.llama), ("GPT-2 h128 ×2, 4×8×64", models.gpt2)):
        model, data = build()
        fns = {"fwd": forward, "fwdbwd": forward_backward, **with_first_batch(**both)}
        fns["hebbian_fast"] = consolidation("local", "hebbian", precision="fast")
        t = best(fns, model, data, args.repeats)
        add_pass(name, "local hebbian ÷ forward", t, "hebbian", "fwd", len(data), "≤ 2.2")
        add(name, 'local hebbian, precision="fast" ÷ forward', t["hebbian_fast"], t["fwd"], "≤ 1.6")
        add_pass(name, "global sample ÷ forward+backward", t, "sample", "fwdbwd", len(data), "≤ 1.3")
    model, data = models.resnet()
    t = best({"fwd": forward, "fwdbwd": forward_backward, **with_first_batch(**both)}, model, data, args.repeats)
    name = "ResNet CNN (BN, in-place ReLU), 4×[16,3,32,32]"
    add_pass(name, "local hebbian ÷ forward", t, "hebbian", "fwd", len(data), "≤ 2.5")
    add_pass(name, "global sample ÷ forward+backward", t, "sample", "fwdbwd", len(data), "≤ 2.0")
    model, data = models.token_mlp()
    name = "token MLP [32,128,256] 256→1024→256"
    micro = consolidation("global", "sample", micro_batch=4)
    t = best(
        {"loop": per_sample_loop, "sample": consolidation("global", "sample"), "micro": micro},
        model,
        data,
        args.repeats,
    )
    loop_mib = max(peak_mib(per_sample_loop, model, data), 1e-9)
    for label, key, fn in (("", "sample", consolidation("global", "sample")), (", micro_batch=4", "micro", micro)):
        mib = peak_mib(fn, model, data)
        add(name, f"per-sample loop ÷ global sample{label}", t["loop"], t[key], "≥ 1.3")
        add(
            name,
            f"peak extra memory, global sample{label} ÷ loop ({mib:.0f} / {loop_mib:.0f} MiB)",
            mib,
            loop_mib,
            "≤ 2",
        )
    for name, build in (("tiny MLP 32→64→10, 4×16", models.tiny_mlp), ("tiny Llama h64 ×1, 4×4×16", models.tiny_llama)):
        model, data = build()
        t = best({"fwd": forward, **with_first_batch(**both)}, model, data, args.repeats)
        add_pass(name, "global sample ÷ forward", t, "sample", "fwd", len(data), "≤ 4")
        add_pass(name, "local hebbian ÷ forward", t, "hebbian", "fwd", len(data), "≤ 4")
    lines = [
        header("Consolidation cost", f"min of {args.repeats} interleaved repeats"),
        "",
        "The pass ratio is the target's; the batches after the first (pass minus a one-batch pass, per batch) show",
        "what the first batch's planning (usage probe, recognition checks) adds to a four-batch pass.",
        "",
        "| model | ratio | pass | batches after the first | target |",
        "|---|---|---|---|---|",
    ] + [f"| {m} | {w} | {r:.2f}× | {st} | {tg} |" for m, w, r, st, tg in rows]
    text = "\n".join(lines)
    if args.real:
        from bench import real_size

        command = f"python bench/consolidation_cost.py {' '.join(argv if argv is not None else sys.argv[1:])}"
        text += "\n\n" + real_size.report("gpt2,llama,depth", min(args.repeats, 2), args.threads, command)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
