"""Command line: ``mas-local compare [options]`` (also ``python -m mas_local compare``)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from collections.abc import Sequence

from . import __version__

DESCRIPTION = """\
Compare global and local (Hebbian) MAS with fine-tuning and joint training on a
sequence of tasks built from scikit-learn's handwritten digits (no download).
Each MAS method's λ is chosen per task from --lam-grid on the validation split of
the tasks seen so far. Writes results.json and PNG plots to --out and prints a table.
See docs/compare.md for the protocol and how to read the outputs."""


def _csv(kind):
    def parse(text: str):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {kind}s, got {text!r}")
        return items

    return parse


def _numbers(text: str) -> tuple[float, ...]:
    """Comma-separated numbers (parsing only: their range is checked once, by ``Config.validate``)."""
    vals = []
    for item in _csv("number")(text):
        try:
            vals.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number (expected e.g. 0.1,1,10)") from None
    return tuple(vals)


def build_parser() -> argparse.ArgumentParser:
    from .experiments.config import DEFAULT_LAM_GRID, METHODS
    from .experiments.data import BENCHMARKS
    from .experiments.models import HIDDEN, MODELS, TRAINING_DEFAULTS
    from .experiments.transformer import DEPTH, HEADS, WIDTH

    parser = argparse.ArgumentParser(prog="mas-local", description="mas-local: Memory Aware Synapses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser(
        "compare",
        help="compare global and local MAS on a digits task sequence",
        description=DESCRIPTION,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    option = c.add_argument

    option(
        "--seeds",
        type=int,
        default=3,
        help="number of seeds (0..N-1); each seed has its own data split, permutations and initial weights",
    )
    option(
        "--tasks",
        type=int,
        default=5,
        help="number of tasks in the sequence (>= 2; at most 5 for --benchmark split)",
    )
    per_model = "; ".join(f"{m} {e}" for m, (e, _, _) in TRAINING_DEFAULTS.items())
    per_model_lr = "; ".join(f"{m} {lr:g}" for m, (_, lr, _) in TRAINING_DEFAULTS.items())
    per_model_batch = "; ".join(f"{m} {b}" for m, (_, _, b) in TRAINING_DEFAULTS.items())
    option(
        "--epochs",
        type=int,
        default=argparse.SUPPRESS,
        help=f"training epochs per task (default per model: {per_model})",
    )
    option(
        "--model",
        choices=MODELS,
        default="mlp",
        help=f"mlp: 64-{HIDDEN}-{HIDDEN}-head; cnn: two 3x3 convs on the 8x8 image, a {HIDDEN}-unit linear "
        f"layer and the head; transformer: pre-LN encoder over 16 patches of 2x2 pixels, width {WIDTH}, "
        f"{DEPTH} blocks of {HEADS}-head attention and a GELU MLP, mean pooling, the head",
    )
    option(
        "--benchmark",
        choices=BENCHMARKS,
        default="permuted",
        help="permuted: fixed pixel permutation per task, shared 10-way head; split: digit pairs "
        "(0/1, 2/3, ...) with one head per task; rotated: rotations evenly spaced in [0, 90] degrees",
    )
    lam_default = ",".join(f"{v:g}" for v in DEFAULT_LAM_GRID)
    option(
        "--lam-grid",
        type=_numbers,
        default=lam_default,
        metavar="L1,L2,...",
        help="candidate penalty strengths λ (comma-separated, >= 0); each MAS method picks one per task "
        "on the validation split of the tasks seen so far",
    )
    option(
        "--methods",
        type=_csv("method"),
        default=",".join(METHODS),
        metavar="M1,M2,...",
        help=f"methods to run (comma-separated) from: {', '.join(METHODS)}",
    )
    option("--out", default="runs/compare", help="output folder for results.json and the PNG plots")
    option("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    option(
        "--batch-size",
        type=int,
        default=argparse.SUPPRESS,
        help=f"training batch size (default per model: {per_model_batch})",
    )
    option(
        "--lr", type=float, default=argparse.SUPPRESS, help=f"Adam learning rate (default per model: {per_model_lr})"
    )
    option(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads while it runs (one is the fastest for these small models)",
    )
    option("--no-plots", action="store_true", help="skip the PNG plots (results.json and the table only)")
    option("--quiet", action="store_true", help="no progress bars (the final table is still printed)")
    parser.compare_parser = c  # its error() prints the compare usage
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        parser.exit(2, "\nmas-local: error: choose a command (e.g. `mas-local compare --help`)\n")
    if args.command == "compare":
        return _compare(args, parser)
    parser.error(f"unknown command {args.command!r}")
    return 2


def _compare(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments.config import Config
    from .experiments.protocol import run
    from .experiments.report import table

    cfg = Config(
        seeds=args.seeds,
        tasks=args.tasks,
        epochs=getattr(args, "epochs", None),  # absent: the model's default
        model=args.model,
        benchmark=args.benchmark,
        lam_grid=tuple(args.lam_grid),
        methods=tuple(args.methods),
        out=args.out,
        device=args.device,
        batch_size=getattr(args, "batch_size", None),
        lr=getattr(args, "lr", None),
        threads=args.threads,
        quiet=args.quiet,
        plots=not args.no_plots,
    )
    sub = parser.compare_parser
    try:
        cfg.validate()
    except (ValueError, RuntimeError) as exc:
        sub.error(str(exc))
    try:  # fail before the training, not after it
        os.makedirs(cfg.out, exist_ok=True)
    except OSError as exc:
        sub.error(f"cannot create the --out folder {cfg.out!r}: {exc}")
    needed = ["sklearn"] + (["matplotlib"] if cfg.plots else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        sub.error(
            f"the comparison needs {' and '.join(missing)}: pip install 'mas-local[compare]' "
            "(scikit-learn, matplotlib)" + (" or pass --no-plots" if missing == ["matplotlib"] else "")
        )
    t0 = time.perf_counter()
    results = run(cfg)
    print(table(results))
    files = ["results.json"] + [p.rsplit("/", 1)[-1] for p in results.get("plots", [])]
    print(f"wrote {', '.join(files)} to {cfg.out} in {time.perf_counter() - t0:.1f} s")
    return 0
