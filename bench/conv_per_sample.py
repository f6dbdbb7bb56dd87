"""Per-sample |weight gradient| sums of a convolution on the CPU: the two methods of the conv rule side by side.

For each convolution of the ResNet-style benchmark CNN (batch 16), Ω += Σ_k |∂⟨Δ_k, conv(x_k)⟩/∂W| by
(a) the unfolded input through the fused per-sample op (what GPUs run) and (b) one weight-gradient
convolution with the batch as groups (what the CPU runs), next to the batch's own weight gradient (the
floor: the same FLOPs, no per-sample split). The two methods are checked against each other first.
Run: ``python bench/conv_per_sample.py [--threads 2] [--repeats 10] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # before torch starts its OpenMP runtime

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.timing import best_of, header  # noqa: E402
from mas_local import ops  # noqa: E402
from mas_local.importance.rules.conv import _per_sample_weight_grads  # noqa: E402

# (in channels, out channels, side, kernel, stride, padding): the convolutions of bench/models.py's ResNetCNN
SHAPES = [
    (3, 32, 32, 3, 1, 1),
    (32, 32, 32, 3, 1, 1),
    (32, 32, 32, 3, 2, 1),
    (32, 32, 16, 3, 1, 1),
    (32, 32, 32, 1, 2, 0),
]


def measure(shape: tuple, b: int, repeats: int, g: torch.Generator) -> dict[str, float]:
    c, o, side, k, stride, pad = shape
    conv = torch.nn.Conv2d(c, o, k, stride=stride, padding=pad, bias=False)
    x = torch.randn(b, c, side, side, generator=g)
    d = torch.randn(F.conv2d(x, conv.weight, stride=stride, padding=pad).shape, generator=g)
    omega = torch.zeros(o, c * k * k)

    def unfolded():
        cols = F.unfold(x, k, padding=pad, stride=stride)  # [B, C·k·k, L]
        ops.eager.per_sample_abs_acc_(omega, d.reshape(b, o, -1).transpose(1, 2), cols.transpose(1, 2))

    def grouped():
        omega.add_(_per_sample_weight_grads(conv, x, (pad, pad), d).abs_().sum(0).view(o, -1))

    def batch_weight_grad():
        torch.nn.grad.conv2d_weight(x, conv.weight.shape, d, stride, pad)

    unfolded()
    want = omega.clone()
    omega.zero_()
    grouped()
    if not torch.allclose(omega, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
        raise SystemExit(f"the two methods disagree for {shape}")
    seconds = best_of({"unfolded": unfolded, "grouped": grouped, "floor": batch_weight_grad}, repeats)
    return {k: v * 1e3 for k, v in seconds.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    b = args.batch
    rows = [(shape[:5], measure(shape, b, args.repeats, g)) for shape in SHAPES]
    lines = [
        header("Conv per-sample |grad| sums on the CPU", f"batch {b}", f"min of {args.repeats} interleaved repeats"),
        "",
        "| C→O, side, kernel, stride | unfolded + fused op (ms) | batch as groups (ms) | batch weight grad (ms) "
        "| unfolded ÷ groups | groups ÷ batch grad |",
        "|---|---|---|---|---|---|",
    ]
    for (c, o, side, k, stride), t in rows:
        lines.append(
            f"| {c}→{o}, {side}, {k}, {stride} | {t['unfolded']:.2f} | {t['grouped']:.2f} | {t['floor']:.2f} "
            f"| {t['unfolded'] / t['grouped']:.2f}× | {t['grouped'] / t['floor']:.2f}× |"
        )
    tot = {key: sum(t[key] for _, t in rows) for key in ("unfolded", "grouped", "floor")}
    lines.append(
        f"| all five | {tot['unfolded']:.2f} | {tot['grouped']:.2f} | {tot['floor']:.2f} "
        f"| {tot['unfolded'] / tot['grouped']:.2f}× | {tot['grouped'] / tot['floor']:.2f}× |"
    )
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
