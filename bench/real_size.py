"""Real sizes: what a consolidation costs on GPT-2 124M and a 336M-parameter Llama, in time and in memory.

Every run is measured in a fresh Python process (the model built from its config with a fixed seed, the same
batches of 4 × 128 tokens): a warm-up on one batch, ``--repeats`` timed runs (the minimum is kept), then one run
whose extra peak memory is the C heap's peak above its level before the run (glibc ``mallinfo2`` sampled after
every aten op, ``bench/consolidation_cost.py``'s probe; tracemalloc does not see torch's CPU allocator). A
consolidation is a whole ``compute_importance`` pass with the defaults (its first batch plans and runs the
self-check), so Ω's accumulators are allocated inside it and counted in its peak.

Rows: the no-grad forward and the forward+backward of Σ‖f‖² (the yardsticks), local ``hebbian`` (with the
default self-check of the first batch, and without it), global ``sample``, the per-sample autograd loop and
``torch.func.vmap(grad)``; then the depth scaling of local ``hebbian`` on a narrow GPT-2 of 12, 24 and 48
layers. The bounds are issue #20's (docs/performance.md).

    python bench/real_size.py [--models gpt2,llama,depth] [--runs forward,hebbian,...] [--repeats 2] [--threads 2]
                              [--out FILE]
    python bench/consolidation_cost.py --real        # the same table after the small models'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.consolidation_cost import forward, forward_backward  # noqa: E402
from bench.timing import emit, header  # noqa: E402

MODELS = {
    "gpt2": ("GPT-2 124M (GPT2Config(), tied 50257 × 768 embedding)", "gpt2_124m"),
    "llama": ("Llama 336M (24 × 1024, MLP 2816, 32000 vocabulary, untied head)", "llama_336m"),
}
DEPTHS = (12, 24, 48)
RUNS = ("forward", "forward_backward", "hebbian", "hebbian_unchecked", "sample", "loop", "vmap")


def _logits(model, batch):
    return model(**batch).logits


def _params(model):
    return [p for p in model.parameters() if p.requires_grad]


run_forward, run_forward_backward = forward, forward_backward  # the yardsticks of consolidation_cost.py


def run_hebbian(model, data):
    import mas_local as ml

    ml.compute_importance(model, data, mode="local", estimator="hebbian", progress=False)


def run_hebbian_unchecked(model, data):
    import mas_local as ml

    ml.compute_importance(model, data, mode="local", estimator="hebbian", progress=False, verify="off")


def run_sample(model, data):
    import mas_local as ml

    ml.compute_importance(model, data, mode="global", estimator="sample", progress=False)


def run_loop(model, data):
    params = _params(model)
    acc = [torch.zeros_like(p) for p in params]
    for b in data:
        ids = b["input_ids"]
        for k in range(ids.shape[0]):
            grads = torch.autograd.grad(_logits(model, {"input_ids": ids[k : k + 1]}).pow(2).sum(), params)
            for a, g in zip(acc, grads):
                a.add_(g.abs())


def run_vmap(model, data):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}

    def loss(p, x):
        return functional_call(model, p, (), {"input_ids": x.unsqueeze(0)}).logits.pow(2).sum()

    for b in data:
        grads = vmap(grad(loss), in_dims=(None, 0))(params, b["input_ids"])
        for n, g in grads.items():
            acc[n].add_(g.abs().sum(0))
        del grads


def child(model_key: str, run: str, repeats: int, threads: int) -> dict:
    """One run in this (fresh) process: seconds (min of ``repeats``) and extra peak MiB."""
    from bench import models
    from bench.consolidation_cost import _PeakHeap

    torch.set_num_threads(threads)
    if model_key.startswith("depth"):
        model, data = models.gpt2_narrow(int(model_key[5:]))
    else:
        model, data = getattr(models, MODELS[model_key][1])()
    fn = globals()[f"run_{run}"]
    fn(model, data[:1])  # warm-up
    seconds = first = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(model, data)
        seconds = min(seconds, time.perf_counter() - start)
        if run in ("hebbian", "hebbian_unchecked", "sample"):
            # a pass of its first batch alone: the later batches' cost is the rest
            start = time.perf_counter()
            fn(model, data[:1])
            first = min(first, time.perf_counter() - start)
    with _PeakHeap() as probe:
        fn(model, data)
    omega = sum(p.numel() for p in _params(model)) * 4 / 2**20
    out = {"seconds": seconds, "peak": probe.peak / 2**20, "omega": omega, "batches": len(data)}
    if first < float("inf"):
        out["first"] = first
    return out


def measure(model_key: str, run: str, repeats: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", model_key, run, str(repeats), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,llama,depth")
    ap.add_argument("--runs", default=",".join(RUNS), help="which rows (default: all); a ratio needs its yardstick")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        key, run, repeats, threads = args.child
        print(json.dumps(child(key, run, int(repeats), int(threads))))
        return 0
    command = f"python bench/real_size.py {' '.join(argv if argv is not None else sys.argv[1:])}"
    runs = [r for r in RUNS if r in args.runs.split(",")]
    emit(report(args.models, args.repeats, args.threads, command, runs), args.out)
    return 0


def report(models: str, repeats: int, threads: int, command: str, runs: list[str] = RUNS) -> str:
    """The real-size tables (markdown), every run measured in a fresh process."""
    torch.set_num_threads(threads)
    wanted = models.split(",")
    lines = [
        header("Real sizes", f"min of {repeats} runs, each kind of run in a fresh process"),
        "",
        f"Command: `{command}`. "
        "Four batches of 4 × 128 random tokens, eval mode. Extra peak: the C heap's peak above its level before "
        "the run (MiB); a consolidation's includes allocating Ω's float32 accumulators (the Ω column) and its "
        "first batch's planning and self-check.",
        "",
    ]
    for key in [k for k in MODELS if k in wanted]:
        title, _ = MODELS[key]
        res = {}
        for run in runs:
            res[run] = measure(key, run, repeats, threads)
            print(key, run, res[run], file=sys.stderr, flush=True)
        fb = res.get("forward_backward", {})
        omega = next((r["omega"] for r in res.values() if "omega" in r), float("nan"))
        lines += [f"## {title}, Ω {omega:.0f} MiB", ""]
        lines += [
            "| run | seconds | ÷ yardstick (pass) | ÷ yardstick (batches after the first) | extra peak (MiB) "
            "| bound (MiB) | within |",
            "|" + "---|" * 7,
        ]
        bounds = {
            "hebbian": ("forward", 2.2, 1.2 * omega + 300),
            "hebbian_unchecked": ("forward", 2.2, 1.2 * omega + 300),
            "sample": ("forward_backward", 1.5, 1.1 * (fb.get("peak", float("nan")) + omega)),
            "loop": ("forward_backward", None, None),
            "vmap": ("forward_backward", None, None),
        }
        names = {
            "forward": "forward, no grad",
            "forward_backward": "forward+backward of Σ‖f‖²",
            "hebbian": "local hebbian (mas-local)",
            "hebbian_unchecked": 'local hebbian, verify="off" (no self-check)',
            "sample": "global sample (mas-local)",
            "loop": "per-sample autograd loop",
            "vmap": "torch.func.vmap(grad)",
        }
        for run in runs:
            r = res[run]
            if "error" in r:
                lines.append(f"| {names[run]} | failed: {r['error']} | | | | | |")
                continue
            ratio, later, bound, ok = "", "", "", ""
            if run in bounds:
                base, max_ratio, max_mib = bounds[run]
                den = res.get(base, {}).get("seconds")
                unit = "forward" if base == "forward" else "fwd+bwd"
                if den:
                    ratio = f"{r['seconds'] / den:.2f}× {unit}"
                if den and "first" in r:
                    n = r["batches"]
                    steady = ((r["seconds"] - r["first"]) / (n - 1)) / (den / n)
                    later = f"{steady:.2f}× {unit}"
                if max_ratio is not None and den:
                    bound = f"{max_mib:.0f}"
                    fine = r["seconds"] / den <= max_ratio and r["peak"] <= max_mib
                    ok = f"{'yes' if fine else 'no'} (≤ {max_ratio}×, ≤ {max_mib:.0f} MiB)"
            row = f"| {names[run]} | {r['seconds']:.2f} | {ratio} | {later} | {r['peak']:.0f} | {bound} | {ok} |"
            lines.append(row)
        lines.append("")
    if "depth" in wanted:
        lines += [
            "## Depth: local hebbian on a narrow GPT-2 (width 128, 1024-token vocabulary)",
            "",
            "| layers | Ω (MiB) | forward peak | hebbian peak | hebbian peak − Ω | hebbian ÷ forward |",
            "|---|---|---|---|---|---|",
        ]
        for depth in DEPTHS:
            f = measure(f"depth{depth}", "forward", repeats, threads)
            h = measure(f"depth{depth}", "hebbian", repeats, threads)
            print(depth, f, h, file=sys.stderr, flush=True)
            if "error" in f or "error" in h:
                lines.append(f"| {depth} | failed: {f.get('error') or h.get('error')} | | | | |")
                continue
            lines.append(
                f"| {depth} | {h['omega']:.1f} | {f['peak']:.0f} | {h['peak']:.0f} | {h['peak'] - h['omega']:.0f} "
                f"| {h['seconds'] / f['seconds']:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
