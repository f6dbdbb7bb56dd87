"""Global ``sample`` at training memory? Its time and extra peak memory beside the model's own forward+backward,
the brute-force per-sample loop and ``torch.func.vmap(grad)``, in one process, on GPT-2 with its full vocabulary.

Memory is the C heap's peak above its level before each run (glibc ``mallinfo2`` sampled after every aten op, as
in ``bench/consolidation_cost.py``), with Ω's accumulators counted inside the runs that make them. Time is the
wall time of the same run (the sampling slows every run alike).

    python bench/global_memory.py [--layers 4] [--batch 8] [--tokens 64] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mas_local as ml  # noqa: E402
from bench.consolidation_cost import _PeakHeap  # noqa: E402
from bench.timing import emit, git_commit  # noqa: E402


def gpt2(layers: int, width: int = 768, heads: int = 12, vocab: int = 50257):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=256)
    cfg._attn_implementation = "eager"
    model = GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    return model


def forward_backward(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    torch.autograd.grad(model(input_ids=ids).logits.pow(2).sum(), params)


def ours(model, ids):
    ml.compute_importance(model, [{"input_ids": ids}], "global", "sample", progress=False, verify="off")


def ours_kept(model, ids):  # every call's Δ held until the backward ends (the path before streaming)
    ml.compute_importance(model, [{"input_ids": ids}], "global", "sample", progress=False, verify="off", stream=False)


def ours_checked(model, ids):  # two batches: the first self-checked (kept), the second streamed
    half = ids.shape[0] // 2
    batches = [{"input_ids": ids[:half]}, {"input_ids": ids[half:]}]
    ml.compute_importance(model, batches, "global", "sample", progress=False)


def loop(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    for k in range(ids.shape[0]):
        grads = torch.autograd.grad(model(input_ids=ids[k : k + 1]).logits.pow(2).sum(), params)
        for a, g in zip(acc, grads):
            a += g.abs()


def vmapped(model, ids):
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, x):
        return functional_call(model, p, (), {"input_ids": x.unsqueeze(0)}).logits.pow(2).sum()

    grads = vmap(grad(loss), in_dims=(None, 0))(params, ids)
    {n: g.abs().sum(0) for n, g in grads.items()}


def measure(fn, model, ids) -> tuple[float, float]:
    fn(model, ids)  # warm-up
    start = time.perf_counter()
    with _PeakHeap() as probe:
        fn(model, ids)
    return time.perf_counter() - start, probe.peak / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = gpt2(args.layers)
    ids = torch.randint(0, 50257, (args.batch, args.tokens), generator=torch.Generator().manual_seed(1))
    omega_mib = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    runs = {
        "forward+backward of Σ‖f‖² (the training step's memory)": forward_backward,
        "global sample (mas-local), verify='off'": ours,
        "global sample, stream=False, verify='off'": ours_kept,
        "global sample, two half batches, the first self-checked": ours_checked,
        "per-sample autograd loop": loop,
        "torch.func.vmap(grad)": vmapped,
    }
    rows = []
    for name, fn in runs.items():
        try:
            seconds, mib = measure(fn, model, ids)
            rows.append((name, f"{seconds:.2f}", f"{mib:.0f}"))
        except Exception as e:  # vmap may not run a model; say so rather than fail the table
            rows.append((name, "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
        print(rows[-1], flush=True)
    lines = [
        f"# Global sample vs the loop and vmap(grad) ({datetime.date.today()}, {platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}, commit {git_commit()})",
        "",
        f"Command: `python bench/global_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"GPT-2 with {args.layers} layers, width 768, its full 50257-token vocabulary (tied embedding and head), "
        f"one batch of {args.batch} × {args.tokens} tokens, eval mode. Ω's float32 accumulators are "
        f"{omega_mib:.0f} MiB. Extra peak: the C heap's peak above its level before the run (MiB).",
        "",
        "| run | seconds | extra peak (MiB) |",
        "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
