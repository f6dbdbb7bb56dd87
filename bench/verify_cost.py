"""What the self-check costs: a pass of 16 batches with ``verify="first"`` (the default) against ``verify="off"``.

Both runs do the same work on the same data in one process (min of interleaved repeats, ``bench/timing.py``);
the ratio is the self-check's overhead over a pass. On a shared 2-core machine those totals vary by ±10% from
run to run, so the table also times the check itself inside one ``verify="first"`` pass (its entry points:
``verify_batch`` and ``StreamCheck``) and gives its share of that pass, which varies far less. Padded text
batches make the check run its samples alone (the costlier form), so the token models get a right-padded
``attention_mask``.
Run: ``python bench/verify_cost.py [--repeats 3] [--threads 2] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "passive")

import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mas_local as ml  # noqa: E402
from bench import models  # noqa: E402
from bench.timing import best_of, header  # noqa: E402

BATCHES = 16


class CheckTimer:
    """Seconds spent inside the self-check's entry points while active."""

    def __init__(self) -> None:
        from mas_local.importance import pipeline, verify

        self.seconds = 0.0
        self._patches = [(pipeline, "verify_batch")] + [
            (verify.StreamCheck, name) for name in ("__init__", "add", "finish")
        ]

    def _timed(self, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapped

    def __enter__(self):
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in self._patches]
        for owner, name, fn in self._saved:
            setattr(owner, name, self._timed(fn))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in self._saved:
            setattr(owner, name, fn)


def _padded(data: list) -> list:
    """Each batch right-padded: sample k keeps T - k % 3 real positions."""
    out = []
    for b in data:
        ids = b["input_ids"]
        mask = torch.ones_like(ids)
        for k in range(ids.shape[0]):
            mask[k, ids.shape[1] - k % 3 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def cases():
    llama, llama_data = models.llama(data=(BATCHES, 8, 64))
    gpt2, gpt2_data = models.gpt2(data=(BATCHES, 8, 64))
    resnet, resnet_data = models.resnet(data=(BATCHES, 16, 32))
    return {
        "llama (hidden 128, 2 layers), 16 × [8, 64] padded": (llama, _padded(llama_data)),
        "gpt2 (hidden 128, 2 layers), 16 × [8, 64] padded": (gpt2, _padded(gpt2_data)),
        "resnet-style CNN, 16 × [16, 3, 32, 32]": (resnet, resnet_data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = [
        header("self-check cost: a 16-batch pass with verify='first' ÷ verify='off'"),
        "",
        "| model | estimator | off (s) | first (s) | ratio | time in the check ÷ pass |",
        "|---|---|---|---|---|---|",
    ]
    for name, (model, data) in cases().items():
        for mode, estimator in (("global", "sample"), ("local", "hebbian"), ("local", "sample")):

            def run(verify, model=model, data=data, mode=mode, estimator=estimator):
                return lambda: ml.compute_importance(
                    model, data, mode=mode, estimator=estimator, verify=verify, progress=False
                )

            t = best_of({"off": run("off"), "first": run("first")}, args.repeats)
            start = time.perf_counter()
            with CheckTimer() as timer:
                run("first")()
            share = timer.seconds / (time.perf_counter() - start)
            lines.append(
                f"| {name} | {mode} {estimator} | {t['off']:.3f} | {t['first']:.3f} | {t['first'] / t['off']:.3f} "
                f"| {share:.1%} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
