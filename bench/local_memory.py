"""Local MAS memory, streamed against kept: the peak extra memory of one batch of a local ``hebbian`` pass
with ``stream=True`` (each call reduced as it returns) and ``stream=False`` (every call kept until the
forward ends), beside the model's own no-grad forward, over depth.

The pass's first batch of a batch signature plans and runs the self-check with every call kept; the table
measures the batch after it (the steady state of a pass) and, separately, that first batch. Memory is the
C heap's peak above its level before the batch (glibc ``mallinfo2`` sampled after every aten op, as in
``bench/consolidation_cost.py``); Ω's accumulators exist before the measured batch and are listed apart.

    python bench/local_memory.py                       # depth 12, 24, 48 of a narrow GPT-2
    python bench/local_memory.py --gpt2                # and GPT-2 124M (GPT2Config()), batch 4 x 128
    python bench/local_memory.py --out bench/results/local_memory_<date>.md
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

from bench.consolidation_cost import _PeakHeap  # noqa: E402
from bench.timing import emit, git_commit  # noqa: E402
from mas_local.config import ImportanceConfig  # noqa: E402
from mas_local.importance.estimator import Estimator  # noqa: E402


def gpt2(layers: int, width: int, heads: int, vocab: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=256)
    model = GPT2LMHeadModel(cfg).eval()
    model.config.use_cache = False
    return model


def batches(vocab: int, b: int, t: int, count: int = 2, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, vocab, (b, t), generator=g)} for _ in range(count)]


def peak(fn) -> tuple[float, float]:
    """(peak extra MiB, seconds) of ``fn()``."""
    start = time.perf_counter()
    with _PeakHeap() as probe:
        fn()
    return probe.peak / 2**20, time.perf_counter() - start


def measure(model, data, stream: bool, verify: str = "first") -> dict:
    config = ImportanceConfig(mode="local", estimator="hebbian", stream=stream, verify=verify, progress=False)
    est = Estimator(model, config=config)
    first, t_first = peak(lambda: est.update(data[0]))
    steady, t_steady = peak(lambda: est.update(data[1]))
    omega = sum(s.numel() * s.element_size() for s in est.stats.sums.values()) / 2**20
    return {"first": first, "steady": steady, "omega": omega, "t_first": t_first, "t_steady": t_steady}


def forward_peak(model, data) -> tuple[float, float]:
    with torch.no_grad():
        model(**data[1])  # warm-up
        return peak(lambda: model(**data[1]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", default="12,24,48")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--gpt2", action="store_true", help="also GPT-2 124M with its full vocabulary")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    models = [(f"GPT-2 {d} layers × {args.width}", d, args.width, 4, 2048) for d in map(int, args.depths.split(","))]
    if args.gpt2:
        models.append(("GPT-2 124M (GPT2Config())", 12, 768, 12, 50257))
    for name, layers, width, heads, vocab in models:
        model = gpt2(layers, width, heads, vocab)
        data = batches(vocab, args.batch, args.tokens)
        fwd, t_fwd = forward_peak(model, data)
        kept = measure(model, data, stream=False)
        streamed = measure(model, data, stream=True)
        unchecked = measure(model, data, stream=True, verify="off")
        streamed["first_off"] = unchecked["first"]
        rows.append((name, fwd, t_fwd, kept, streamed))
        print(
            f"{name}: forward {fwd:.0f} MiB; kept {kept['steady']:.0f} MiB; streamed {streamed['steady']:.0f} MiB; "
            f"Ω {streamed['omega']:.0f} MiB",
            flush=True,
        )
        del model
    lines = [
        f"# Local hebbian memory, streamed vs kept ({datetime.date.today()}, {platform.machine()}, "
        f"{args.threads} threads, torch {torch.__version__}, commit {git_commit()})",
        "",
        f"Command: `python bench/local_memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`. "
        f"Batches of {args.batch} × {args.tokens} tokens. Extra peak: the C heap's peak above its level before "
        "the batch (MiB); Ω's accumulators are allocated before the measured batch and listed apart. "
        '"Steady": a batch after the first of its signature. "First": the first, streamed: a planning forward, '
        'then the batch, with the self-check (`verify="first"`, the default) or without it; it includes '
        "allocating Ω's accumulators, and the check's sums of the parameters it checks (under `hebbian`, those "
        "without a Hebbian rule), held whole up to 65,536 elements and as sketches above that (docs/math.md).",
        "",
        "| model | Ω (MiB) | forward no-grad peak | kept: steady peak | streamed: steady peak | streamed ÷ kept "
        "| first batch peak (checked) | first batch peak (verify off) | streamed time ÷ forward |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, fwd, t_fwd, kept, st in rows:
        lines.append(
            f"| {name} | {st['omega']:.0f} | {fwd:.0f} | {kept['steady']:.0f} | {st['steady']:.0f} | "
            f"{st['steady'] / max(kept['steady'], 1e-9):.2f} | {st['first']:.0f} | {st['first_off']:.0f} | "
            f"{st['t_steady'] / t_fwd:.2f} |"
        )
    emit("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
