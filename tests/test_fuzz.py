"""Property-based fuzzer: random models from tests/fuzz_grammar.py, every estimator, plain and converted,
against the brute-force oracles of tests/fuzz_oracles.py (each sample alone and unpadded).

Each run is classified:
  exact    every Ω within rtol 1e-5, atol 1e-6 × the model's largest Ω (Ω accumulates in float32)
  refused  an ImportanceError whose message names a parameter or module path of the model
  crash    any other exception (an ImportanceError naming neither counts here too)
  wrong    numbers differ (or names are missing)
The test asserts 0 wrong and 0 crash.

Environment: MAS_FUZZ_N (models, default 200: 1,600 runs), MAS_FUZZ_SEED (base seed, default 0),
MAS_FUZZ_REPORT (a path: write every run's outcome as JSON lines, used by tests/fuzz_mutations.py),
MAS_FUZZ_VERIFY (the library's verify=, default "first"; "off" runs the engine without its self-check).

Reproduce one run:  PYTHONPATH=. MAS_LOCAL_NO_EXT=1 python -m tests.test_fuzz SEED MODE-ESTIMATOR [converted]
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from collections import Counter, defaultdict

import pytest
import torch

import mas_local as ml
from mas_local.errors import ImportanceError
from tests import fuzz_oracles, oracles
from tests.fuzz_grammar import build_case

N = int(os.environ.get("MAS_FUZZ_N", "200"))
# the library's self-check (on by default, as users run it); "off" tests the engine without its safety net
VERIFY = os.environ.get("MAS_FUZZ_VERIFY", "first")
BASE = int(os.environ.get("MAS_FUZZ_SEED", "0"))
CHUNK = 5
RUNS = [("global", "sample"), ("global", "batch"), ("local", "hebbian"), ("local", "sample")]
RTOL, ATOL = 1e-5, 1e-6

RESULTS: list[dict] = []  # every run of this session, for the summary


def _names_in(msg: str, model) -> list[str]:
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_modules() if n]
    return [n for n in names if n in msg]


def compare(got: dict, want: dict):
    """None when exact, else (worst parameter, description)."""
    missing = set(want) ^ set(got)
    if missing:
        return sorted(missing)[0], f"names differ: {sorted(missing)}"
    scale = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
    worst = None
    for n, w in want.items():
        g = got[n].double()
        if g.shape != w.shape:
            return n, f"{n}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        err = (g - w).abs() - (ATOL * scale + RTOL * w.abs())
        if not torch.isfinite(g).all() or err.max().item() > 0:
            rel = ((g - w).abs().max() / max(w.abs().max().item(), 1e-300)).item()
            if worst is None or rel > worst[2]:
                worst = (n, f"{n}: max|Δ| {(g - w).abs().max().item():.3g}, max|Ω| {w.abs().max().item():.3g}", rel)
    return None if worst is None else worst[:2]


def wrong_params(got, want):
    scale = max((w.abs().max().item() for w in want.values() if w.numel()), default=0.0)
    out = []
    for n, w in want.items():
        if n not in got or got[n].shape != w.shape:
            out.append(n)
            continue
        g = got[n].double()
        if not torch.isfinite(g).all() or ((g - w).abs() - (ATOL * scale + RTOL * w.abs())).max().item() > 0:
            out.append(n)
    return out


def run_one(case, mode, estimator, converted, want):
    model = case.model
    if converted:
        model = ml.convert(copy.deepcopy(model))
    rec = {
        "seed": case.seed,
        "family": case.family,
        "patterns": case.patterns,
        "extras": case.extras,
        "run": f"{mode}-{estimator}",
        "converted": converted,
        "lib": os.path.dirname(os.path.abspath(ml.__file__)),
    }
    try:
        got = ml.compute_importance(
            model,
            case.data,
            mode=mode,
            estimator=estimator,
            chunk_bytes=case.chunk_bytes,
            progress=False,
            verify=VERIFY,
        )
    except ImportanceError as exc:
        msg = str(exc)
        named = _names_in(msg, model)
        rec.update(outcome="refused" if named else "crash", error=f"ImportanceError: {msg.splitlines()[0]}")
        rec["blame"] = sorted({case.owner(n) for n in named if n.startswith("blocks.")} or set())
        return rec
    except Exception as exc:  # noqa: BLE001 - classified
        tb = traceback.extract_tb(exc.__traceback__)
        where = next(
            (f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(tb) if "mas_local" in f.filename), ""
        )
        rec.update(
            outcome="crash", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} [{where}]"
        )
        rec["blame"] = []
        return rec
    bad = compare(got, want)
    if bad is None:
        rec.update(outcome="exact", blame=[])
    else:
        params = wrong_params(got, want)
        rec.update(outcome="wrong", error=bad[1], wrong_params=params, blame=sorted({case.owner(n) for n in params}))
    return rec


def run_case(seed):
    case = build_case(seed)
    records = []
    for mode, estimator in RUNS:
        want = fuzz_oracles.ORACLES[(mode, estimator)](case, case.model)
        for converted in (False, True):
            records.append(run_one(case, mode, estimator, converted, want))
    return case, records


def _hint(rec):
    conv = " converted" if rec["converted"] else ""
    return f"PYTHONPATH=. MAS_LOCAL_NO_EXT=1 python -m tests.test_fuzz {rec['seed']} {rec['run']}{conv}"


def _line(rec):
    return (
        f"seed={rec['seed']} {rec['run']}{' converted' if rec['converted'] else ''} {rec['outcome'].upper()} "
        f"family={rec['family']} blocks={rec['patterns']} blame={rec['blame']}: {rec.get('error', '')}"
        f"\n    {_hint(rec)}"
    )


def summary(records) -> str:
    """pattern -> outcome counts per run kind. A failing run counts against the blocks it blames
    (parameters that differ, or paths the error names); the case's other blocks count as exact."""
    table = defaultdict(Counter)
    for rec in records:
        pats = rec["patterns"] + rec["extras"] + [f"{rec['family']}-stem/head"]
        for p in pats:
            if rec["outcome"] == "exact" or (rec["blame"] and p not in rec["blame"]):
                table[p]["exact"] += 1
            else:
                table[p][f"{rec['outcome']}:{rec['run']}"] += 1
    total = Counter(rec["outcome"] for rec in records)
    lines = [f"runs: {len(records)}  " + "  ".join(f"{k}={v}" for k, v in sorted(total.items()))]
    for p in sorted(table):
        lines.append(f"  {p:28s} " + "  ".join(f"{k}={v}" for k, v in sorted(table[p].items())))
    return "\n".join(lines)


def _report(records):
    path = os.environ.get("MAS_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


SEEDS = list(range(BASE, BASE + N))
CHUNKS = [SEEDS[i : i + CHUNK] for i in range(0, len(SEEDS), CHUNK)]


@pytest.mark.parametrize("seeds", CHUNKS, ids=[f"seeds{c[0]}-{c[-1]}" for c in CHUNKS])
def test_fuzz(seeds):
    records = []
    for seed in seeds:
        records += run_case(seed)[1]
    RESULTS.extend(records)
    _report(records)
    bad = [r for r in records if r["outcome"] in ("wrong", "crash")]
    assert not bad, f"{len(bad)}/{len(records)} runs wrong or crashed:\n" + "\n".join(map(_line, bad))


def test_fuzz_summary(capsys):
    """Runs last: prints the pattern table of this session's fuzz runs."""
    if not RESULTS:
        pytest.skip("no fuzz runs in this session")
    with capsys.disabled():
        print("\n" + summary(RESULTS))
    assert len(RESULTS) >= min(200, 8 * N)


# ----------------------------------------------------------------------------- the fuzzer's own checks


@pytest.mark.parametrize("seeds", CHUNKS, ids=[f"seeds{c[0]}-{c[-1]}" for c in CHUNKS])
def test_grammar_models_are_padding_invariant(seeds):
    """The oracles run each sample alone and unpadded: that is only the batch's Ω if each sample's real
    outputs do not depend on the other samples or on padding (eval mode, causal or per-position blocks)."""
    for seed in seeds:
        case = build_case(seed)
        with torch.no_grad():
            for batch, singles in zip(case.data, case.singles):
                full = oracles._out(case.model, batch)
                for k, one in enumerate(singles):
                    y = oracles._out(case.model, one)
                    part = full[k : k + 1, : y.shape[1]] if case.family == "tok" else full[k : k + 1]
                    torch.testing.assert_close(part, y, msg=lambda m, s=seed, k=k: f"seed {s} sample {k}: {m}")


def test_conv_hebbian_oracle_matches_conv_weight_grad():
    """The explicit position loop of fuzz_oracles equals conv2d_weight(|x padded by the layer's mode|, |y|) / R."""
    torch.manual_seed(0)
    for pm in ("zeros", "reflect", "replicate", "circular"):
        for groups, dil, stride in ((1, 1, 1), (2, 2, 1), (1, 1, 2)):
            conv = torch.nn.Conv2d(4, 6, 3, stride=stride, padding=1, dilation=dil, groups=groups, padding_mode=pm)
            conv = conv.double()
            x = torch.randn(1, 4, 5, 6, dtype=torch.float64)
            y = conv(x).detach()
            w, b, r = fuzz_oracles._conv_events(conv, x, y)
            mode = "constant" if pm == "zeros" else pm
            xp = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
            want = torch.nn.grad.conv2d_weight(xp.abs(), conv.weight.shape, y.abs(), stride, 0, dil, groups)
            torch.testing.assert_close(w, want)
            torch.testing.assert_close(b, y.abs().sum((0, 2, 3)))
            assert r == y.shape[2] * y.shape[3]


def _main(argv):
    seed, run = int(argv[0]), argv[1]
    converted = len(argv) > 2 and argv[2] == "converted"
    mode, estimator = run.split("-")
    case = build_case(seed)
    print(case.describe())
    print(case.model)
    want = fuzz_oracles.ORACLES[(mode, estimator)](case, case.model)
    model = ml.convert(copy.deepcopy(case.model)) if converted else case.model
    got = ml.compute_importance(
        model, case.data, mode=mode, estimator=estimator, chunk_bytes=case.chunk_bytes, progress=False, verify=VERIFY
    )
    for n in wrong_params(got, want):
        print(f"{n}:\n  got  {got[n].double().flatten()[:6].tolist()}\n  want {want[n].flatten()[:6].tolist()}")
    print("exact" if compare(got, want) is None else f"WRONG: {compare(got, want)[1]}")


if __name__ == "__main__":
    _main(sys.argv[1:])
