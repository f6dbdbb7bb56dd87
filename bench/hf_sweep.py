"""Sweep every Hugging Face model family of the installed ``transformers``: build it tiny from its config
(random init, nothing downloaded), run the four estimator checks of ``tests/hf_families.py`` and write
``docs/models.md`` and ``bench/results/hf_sweep.json``.

    python bench/hf_sweep.py [--families a,b] [--limit N] [--timeout S] [--out docs/models.md]
                             [--json bench/results/hf_sweep.json] [--quiet] [--jobs J]

Each family runs in a worker process (``--jobs`` of them, one torch thread each) under a per-family time
limit: past it the family is recorded as "timeout" (a worker that does not answer is killed and replaced).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import queue
import selectors
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SYMBOL = {"exact": "✓", "refused": "refused", "crash": "crash", "wrong": "✗", "n/a": "n/a", "timeout": "timeout"}


# ------------------------------------------------------------------------------------------------ worker


def _worker(timeout: int) -> None:
    """Read family names (``name head`` lines) on stdin, answer one JSON line each on the original stdout."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the models print goes to stderr
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from tests import hf_families as hf

    def alarm(signum, frame):
        raise TimeoutError(f"over {timeout} s")

    signal.signal(signal.SIGALRM, alarm)
    for line in sys.stdin:
        family, head = line.split()
        t0 = time.time()
        signal.alarm(timeout)
        try:
            res = hf.check_family(family, head)
        except TimeoutError as e:
            res = {"family": family, "head": head, "status": f"timeout: {e}", "checks": {}, "notes": []}
        except BaseException as e:  # noqa: BLE001 - a family must never stop the sweep
            res = {
                "family": family,
                "head": head,
                "status": f"not built: {type(e).__name__}: {e}"[:300],
                "checks": {},
                "notes": [],
            }
        finally:
            signal.alarm(0)
        res["seconds"] = round(time.time() - t0, 2)
        proto.write(json.dumps(res, default=str) + "\n")


class _Slot:
    """One worker process; restarted when it dies or stops answering."""

    def __init__(self, timeout: int, log):
        self.timeout, self.log, self.proc = timeout, log, None

    def _start(self):
        env = dict(os.environ, PYTHONPATH=f"{ROOT}:{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", "--timeout", str(self.timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def ask(self, family, head):
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{family} {head}\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        # a fresh worker imports torch and transformers first; then the family's own limit, plus grace
        ready = sel.select(timeout=self.timeout + 90)
        sel.close()
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        reason = "timeout: no answer (worker killed)" if not ready else "crash: the worker process died"
        self.close(kill=True)
        return {"family": family, "head": head, "status": reason, "checks": {}, "notes": []}

    def close(self, kill=False):
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def sweep(families: dict, jobs: int, timeout: int, quiet: bool, log_path: Path, partial: Path | None = None):
    """Run the families over ``jobs`` workers; each result is also appended to ``partial`` (JSON lines) as it
    arrives, so an interrupted sweep leaves what it had."""
    from tqdm import tqdm

    todo: queue.Queue = queue.Queue()
    for fam, (_, head) in families.items():
        todo.put((fam, head))
    results, lock = [], threading.Lock()
    bar = tqdm(total=len(families), disable=quiet, desc="families", dynamic_ncols=True)
    log = open(log_path, "w")
    part = open(partial, "w") if partial else None

    def loop():
        slot = _Slot(timeout, log)
        try:
            while True:
                try:
                    fam, head = todo.get_nowait()
                except queue.Empty:
                    return
                res = slot.ask(fam, head)
                res["kind"] = families[fam][0]
                with lock:
                    results.append(res)
                    if part:
                        part.write(json.dumps(res, default=str) + "\n")
                        part.flush()
                    bar.set_postfix_str(f"{fam}: {res['status'][:30]}")
                    bar.update()
        finally:
            slot.close()

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bar.close()
    log.close()
    if part:
        part.close()
    return sorted(results, key=lambda r: r["family"])


# ------------------------------------------------------------------------------------------------ report


def _summary(results):
    from tests.hf_families import ESTIMATORS

    built = [r for r in results if r["status"] == "built"]
    per = {e: {} for e in ESTIMATORS}
    for r in built:
        for e in ESTIMATORS:
            s = r["checks"].get(e, {}).get("status", "n/a")
            per[e][s] = per[e].get(s, 0) + 1

    def all_are(r, s):
        return all(r["checks"].get(e, {}).get("status") == s for e in ESTIMATORS)

    def any_is(r, s):
        return any(r["checks"].get(e, {}).get("status") == s for e in ESTIMATORS)

    return {
        "discovered": len(results),
        "built": len(built),
        "exact_in_all_four": sum(all_are(r, "exact") for r in built),
        "model_not_invariant": sum(any_is(r, "n/a") for r in built),
        "with_a_refusal": sum(any_is(r, "refused") for r in built),
        "with_a_crash": sum(any_is(r, "crash") for r in built),
        "with_a_wrong": sum(any_is(r, "wrong") for r in built),
        "timeouts": sum(r["status"].startswith("timeout") for r in results),
        "not_built": sum(r["status"].startswith("not built") for r in results),
        "per_estimator": per,
    }


def _cell(check, notes):
    s = check.get("status", "n/a")
    if s == "exact":
        return "✓"
    if s == "wrong":
        return f"✗ {check['error']:.2g}"
    if s in ("refused", "crash") or (s == "n/a" and check.get("detail")):
        text = check.get("detail", "")
        if s == "crash" and check.get("where"):
            text += f" (at {check['where']})"
        if text not in notes:
            notes.append(text)
        return f"{s} [{notes.index(text) + 1}]"
    return s


def _esc(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_markdown(results, path: Path, command: str, elapsed: float):
    import torch
    import transformers

    from tests.hf_families import ESTIMATORS, LENGTHS

    s = _summary(results)
    today = datetime.date.today().isoformat()
    lines = [
        "# Hugging Face model families",
        "",
        f"Generated by `{command}` on {today} (transformers {transformers.__version__}, torch {torch.__version__},"
        f" CPU, {elapsed / 60:.1f} min). Do not edit by hand: run the sweep again.",
        "",
        "Every model_type of the installed `transformers` that one of the head mappings names (causal LM, then"
        " masked LM, seq2seq LM, sequence classification, image classification, audio classification, CTC,"
        " speech seq2seq: the first that names it gives its head class) is built from its default config"
        " shrunk to a tiny one (hidden 16, 2 layers, 2 heads, vocabulary 128, 4 experts with 2 per token,"
        " 32×32 images, random init, nothing downloaded), in float64, `eval()`, eager attention and eager"
        " MoE experts (`tests/hf_families.py`).",
        "",
        f"Inputs: text is two batches of samples of {LENGTHS[0]} then {LENGTHS[1]} tokens, right-padded with the"
        " pad token, with an `attention_mask`; encoder-decoder models pad the encoder only and get 3 real"
        " `decoder_input_ids` per sample. Images and audio: float batches of 3 and 2 samples, no mask.",
        "",
        "Checks (tolerance rtol 1e-5, atol 1e-6 × the largest |Ω| of the model; for global batch, of the"
        " global sample Ω, the size of the gradients whose sum it takes: a sum that cancels keeps their"
        " rounding error, as in MobileViT's, whose output is about 1e-41):",
        "",
        '- **global sample**: `compute_importance(mode="global", estimator="sample")` on the padded batches,'
        " each given twice (the second of each batch signature skips the self-check and is reduced during the"
        " backward, the streamed path), against the brute-force loop over the *unpadded* samples, each alone:"
        " (1/N) Σ_k |∂‖f(x_k)‖²/∂θ|.",
        '- **global batch**: `estimator="batch"` against the official formula'
        " (1/#B) Σ_B |Σ_{k∈B} ∂‖f(x_k)‖²/∂θ| / b_B"
        " (the gradients from the unpadded samples; two batches of unequal sizes).",
        "- **local hebbian**, **local sample**: every trainable parameter gets a finite Ω, and Ω of the padded,"
        " masked batches equals Ω of the same samples unpadded, each passed as its own batch of one (for"
        " images and audio: a batch equals its samples one by one). T5-style relative position biases are"
        ' left out of this comparison (docs/math.md, "Masks": judged over the padded grid by definition).',
        "",
        "✓ exact; ✗ wrong, with the largest error relative to the worst parameter's own max |Ω|;"
        " refused (an `ImportanceError`) and crash (any other exception) with the message in the notes;"
        " n/a where the check differs but the model's own output on the real positions already changes with"
        " padding or batching (the oracles assume it does not; the set-up column gives by how much).",
        "",
        "## Summary",
        "",
        "| | count |",
        "|---|---|",
        f"| families discovered | {s['discovered']} |",
        f"| built (and ran a forward on the inputs) | {s['built']} |",
        f"| exact in all four checks | {s['exact_in_all_four']} |",
        f"| with a refusal | {s['with_a_refusal']} |",
        f"| with a crash | {s['with_a_crash']} |",
        f"| with a wrong result | {s['with_a_wrong']} |",
        f"| n/a: the model's own output changes with padding/batching | {s['model_not_invariant']} |",
        f"| timeouts | {s['timeouts']} |",
        f"| not built | {s['not_built']} |",
        "",
        "| estimator | " + " | ".join(k for k in ("exact", "refused", "crash", "wrong", "n/a")) + " |",
        "|---|---|---|---|---|---|",
    ]
    for e in ESTIMATORS:
        c = s["per_estimator"][e]
        lines.append(
            f"| {e.replace('_', ' ')} | "
            + " | ".join(str(c.get(k, 0)) for k in ("exact", "refused", "crash", "wrong", "n/a"))
            + " |"
        )
    notes: list[str] = []
    lines += [
        "",
        "## Families that built",
        "",
        "| family | head class | global sample | global batch | local hebbian | local sample | set-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r["status"] != "built":
            continue
        cells = [_cell(r["checks"].get(e, {}), notes) for e in ESTIMATORS]
        setup = "; ".join(r.get("notes", []))
        lines.append(f"| {r['family']} | `{r['head']}` | " + " | ".join(_esc(c) for c in cells) + f" | {_esc(setup)} |")
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"{i + 1}. {_esc(n)}" for i, n in enumerate(notes)]
    lines += ["", "## Families that did not build or timed out", ""]
    lines += ["| family | head class | reason |", "|---|---|---|"]
    for r in results:
        if r["status"] != "built":
            lines.append(f"| {r['family']} | `{r['head']}` | {_esc(r['status'])[:250]} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated model_types (default: all discovered)")
    ap.add_argument("--limit", type=int, help="only the first N families (alphabetical)")
    ap.add_argument("--timeout", type=int, default=60, help="seconds per family")
    ap.add_argument("--out", default="docs/models.md")
    ap.add_argument("--json", default="bench/results/hf_sweep.json")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.timeout)

    os.environ.setdefault("MAS_LOCAL_NO_EXT", "1")
    from tests.hf_families import discover

    found = discover()
    if args.families:
        wanted = [f.strip() for f in args.families.split(",") if f.strip()]
        unknown = [f for f in wanted if f not in found]
        if unknown:
            ap.error(f"unknown families: {unknown}")
        found = {f: found[f] for f in wanted}
    if args.limit:
        found = dict(list(found.items())[: args.limit])
    out, js = ROOT / args.out, ROOT / args.json
    js.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = sweep(found, args.jobs, args.timeout, args.quiet, js.with_suffix(".log"), js.with_suffix(".jsonl"))
    elapsed = time.time() - t0
    command = "python bench/hf_sweep.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]))
    import torch
    import transformers

    js.write_text(
        json.dumps(
            {
                "command": command.strip(),
                "date": datetime.date.today().isoformat(),
                "seconds": round(elapsed, 1),
                "transformers": transformers.__version__,
                "torch": torch.__version__,
                "summary": _summary(results),
                "results": results,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    write_markdown(results, out, command.strip(), elapsed)
    s = _summary(results)
    print(
        f"{s['discovered']} families, {s['built']} built, {s['exact_in_all_four']} exact in all four, "
        f"{s['with_a_refusal']} with a refusal, {s['with_a_crash']} with a crash, {s['with_a_wrong']} wrong, "
        f"{s['timeouts']} timeouts ({elapsed:.0f} s) -> {out}, {js}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
