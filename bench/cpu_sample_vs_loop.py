"""Global `sample` importance vs the brute-force per-sample autograd loop, same model and data.

Run: python bench/cpu_sample_vs_loop.py  (prints a markdown table; CPU-sized)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

import mas_local as ml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.timing import header  # noqa: E402


def per_sample_loop(model, batches):
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in params]
    n = 0
    for x in batches:
        for k in range(x.shape[0]):
            grads = torch.autograd.grad(model(x[k : k + 1]).pow(2).sum(), params)
            for a, g in zip(acc, grads):
                a += g.abs()
            n += 1
    return [a / n for a in acc]


def timed(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def cases():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    yield "MLP 784-512-512-10, 2-D input", mlp, [torch.randn(128, 784) for _ in range(4)]
    seq = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.LayerNorm(512), nn.Linear(512, 256))
    yield "token MLP [B=32,T=64,256]", seq, [torch.randn(32, 64, 256) for _ in range(2)]
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    yield "CNN on [64,3,32,32]", cnn, [torch.randn(64, 3, 32, 32) for _ in range(2)]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()
    lines = [
        header("global `sample` vs per-sample autograd loop"),
        "",
        "| model / data | samples | per-sample loop (s) | mas_local (s) | speed-up | max rel. diff |",
        "|---|---|---|---|---|---|",
    ]
    for name, model, data in cases():
        model.eval()
        n = sum(x.shape[0] for x in data)
        t_loop, ref = timed(lambda m=model, d=data: per_sample_loop(m, d), repeats=1)
        t_ml, got = timed(lambda m=model, d=data: ml.compute_importance(m, d, progress=False))
        diff = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got.values(), ref))
        lines.append(f"| {name} | {n} | {t_loop:.3f} | {t_ml:.3f} | {t_loop / t_ml:.1f}× | {diff:.1e} |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
