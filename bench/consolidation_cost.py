"""What a consolidation costs, as a multiple of the passes it is made of (CPU, one run, min of interleaved repeats).

Prints the table of docs/performance.md: local hebbian ÷ forward, global sample ÷ forward+backward of Σ‖f‖²,
the per-sample autograd loop ÷ global sample (with both peak memories), and consolidation ÷ forward on tiny
models. Run: ``python bench/consolidation_cost.py [--repeats 5] [--threads 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mas_local as ml  # noqa: E402
from bench import models  # noqa: E402


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


def peak_rss_mib(kind: str) -> float:
    """Peak resident memory of a fresh process running one of the token-MLP measurements, in MiB."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    fn = "per_sample_loop" if kind == "loop" else "consolidation('global', 'sample')"
    code = (
        f"import resource, sys; sys.path.insert(0, {root!r}); from bench import models; "
        "from bench.consolidation_cost import per_sample_loop, consolidation; "
        "m, d = models.token_mlp(); base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"{fn}(m, d); print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []

    def add(model_name, what, num, den, target):
        rows.append((model_name, what, num / den, target))

    for name, build in (("Llama h128 ×2, 4×8×64 tokens", models.llama), ("GPT-2 h128 ×2, 4×8×64", models.gpt2)):
        model, data = build()
        t = best(
            {
                "fwd": forward,
                "fwdbwd": forward_backward,
                "hebbian": consolidation("local", "hebbian"),
                "hebbian_fast": consolidation("local", "hebbian", precision="fast"),
                "sample": consolidation("global", "sample"),
            },
            model,
            data,
            args.repeats,
        )
        add(name, "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 2.2")
        add(name, 'local hebbian, precision="fast" ÷ forward', t["hebbian_fast"], t["fwd"], "≤ 1.6")
        add(name, "global sample ÷ forward+backward", t["sample"], t["fwdbwd"], "≤ 1.3")
    model, data = models.resnet()
    t = best(
        {
            "fwd": forward,
            "fwdbwd": forward_backward,
            "hebbian": consolidation("local", "hebbian"),
            "sample": consolidation("global", "sample"),
        },
        model,
        data,
        args.repeats,
    )
    add("ResNet CNN (BN, in-place ReLU), 4×[16,3,32,32]", "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 2.5")
    add(
        "ResNet CNN (BN, in-place ReLU), 4×[16,3,32,32]",
        "global sample ÷ forward+backward",
        t["sample"],
        t["fwdbwd"],
        "≤ 2.0",
    )
    model, data = models.token_mlp()
    t = best({"loop": per_sample_loop, "sample": consolidation("global", "sample")}, model, data, args.repeats)
    loop_mib, sample_mib = peak_rss_mib("loop"), peak_rss_mib("sample")
    add("token MLP [32,128,256] 256→1024→256", "per-sample loop ÷ global sample", t["loop"], t["sample"], "≥ 1.3")
    add(
        "token MLP [32,128,256] 256→1024→256",
        f"peak memory global sample ÷ loop ({sample_mib:.0f} / {loop_mib:.0f} MiB)",
        sample_mib,
        max(loop_mib, 1e-9),
        "≤ 2",
    )
    for name, build in (("tiny MLP 32→64→10, 4×16", models.tiny_mlp), ("tiny Llama h64 ×1, 4×4×16", models.tiny_llama)):
        model, data = build()
        t = best(
            {"fwd": forward, "sample": consolidation("global", "sample"), "hebbian": consolidation("local", "hebbian")},
            model,
            data,
            args.repeats,
        )
        add(name, "global sample ÷ forward", t["sample"], t["fwd"], "≤ 4")
        add(name, "local hebbian ÷ forward", t["hebbian"], t["fwd"], "≤ 4")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Consolidation cost ({datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}, commit {commit}, "
        f"min of {args.repeats} interleaved repeats)",
        "",
        "| model | ratio | measured | target |",
        "|---|---|---|---|",
    ] + [f"| {m} | {w} | {r:.2f}× | {tg} |" for m, w, r, tg in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
