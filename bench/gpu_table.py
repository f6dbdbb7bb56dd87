#!/usr/bin/env python3
"""Side-by-side GPU table for the sizes of the performance targets (``docs/triton.md``), in one run.

For each piece of work it times, on the same inputs: the naive torch code a user
writes today, the plain cuBLAS/cuDNN reference point, and every backend that can
run it through the public ops (``backend="triton"``; ``backend="ext"`` when the
extension is built), each first checked against the exact torch reference. Times
are medians (``triton.testing.do_bench`` on CUDA); extra memory is the peak of
``torch.cuda.max_memory_allocated`` over one call, outside the timing loop.

    python3 bench/gpu_table.py [--out FILE] [--only abs,sample,penalty,fp32,sample32,conv,designs]
                               [--autotune] [--compile]
    python3 bench/gpu_table.py --small      # tiny sizes: smoke test on CPU under TRITON_INTERPRET=1

Built to fit a short GPU window: Triton autotuning is off (``MAS_LOCAL_TRITON_AUTOTUNE=0``:
the first config that fits; ``--autotune`` to tune), and the ``torch.compile`` penalty
baseline, which compiles for minutes, runs only with ``--compile``. With ``--out`` the
table is rewritten after every row, so a run cut short still leaves what it measured.
The markdown table (date, device, git commit) is printed last.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

#: The sections, in the order they run: the headline comparisons first, so that a run cut short
#: by its deadline has measured them.
SECTIONS = ("abs", "sample", "penalty", "fp32", "sample32", "conv", "designs")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--out", help="also write the markdown table to this file (after every row)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of sections")
    ap.add_argument("--autotune", action="store_true", help="let Triton autotune (minutes of compiles)")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile penalty baseline (slow)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    unknown = set(args.only.split(",")) - set(SECTIONS)
    if unknown:
        print(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        if not args.small:
            print("no CUDA device: use --small for a CPU smoke test", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Read by mas_local.kernels at import: set it before anything imports them.
    os.environ["MAS_LOCAL_TRITON_AUTOTUNE"] = "1" if args.autotune else "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.append(root)  # appended: an installed (or staged) mas_local keeps precedence over the checkout

    import mas_local
    from bench import sections as sec
    from bench.table import CUDA, DEV, Table

    t = Table(args.out, small=args.small)
    only = set(args.only.split(","))
    s = args.small
    t.note(
        f"Triton autotuning {'on' if args.autotune else 'off (first config that fits)'}; "
        f"torch.compile baseline {'on' if args.compile else 'off (--compile)'}"
    )
    print(f"mas_local {mas_local.__version__} from {os.path.dirname(mas_local.__file__)} on {DEV}", flush=True)
    gemm = (64, 24, 40) if s else (16384, 4096, 4096)
    penalty = (3, 40) if s else (91, 4096)
    runs = [
        (
            "abs",
            lambda: sec.abs_gemm_section(
                t, *gemm, torch.bfloat16, "small bf16" if s else "N=16384, 4096×4096 bf16", ("accurate", "fast")
            ),
        ),
        (
            "fp32",
            lambda: sec.abs_gemm_section(
                t, *gemm, torch.float32, "small fp32" if s else "N=16384, 4096×4096 fp32", ("accurate", "exact", "fast")
            ),
        ),
        (
            "sample",
            lambda: sec.per_sample_section(t, *((2, 16, 24, 20) if s else (32, 512, 2048, 2048)), torch.bfloat16),
        ),
        (
            "sample32",
            lambda: sec.per_sample_section(
                t, *((2, 16, 24, 20) if s else (64, 196, 256, 576)), torch.float32, ("accurate", "exact")
            ),
        ),
        ("conv", lambda: sec.conv_section(t, *((2, 8, 6) if s else (64, 256, 28)), torch.bfloat16)),
        (
            "penalty",
            lambda: [
                sec.copy_bandwidth(t, 1 << 20 if s else 1 << 30),
                sec.penalty_section(t, *penalty, torch.float32, compile_baselines=args.compile),
                sec.penalty_section(t, *penalty, torch.bfloat16),
            ],
        ),
        ("designs", lambda: sec.designs_section(t, s)),
    ]
    runs = dict(runs)
    for name in SECTIONS:
        run = runs[name]
        if name not in only:
            continue
        try:
            run()
        except Exception as exc:  # noqa: BLE001 - a failed section must not end the table
            t.failed(name, "section", exc)
        if CUDA:
            torch.cuda.empty_cache()
    t.flush()
    print("\n" + t.markdown())
    return 1 if t.bad() else 0


if __name__ == "__main__":
    sys.exit(main())
