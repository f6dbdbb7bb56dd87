"""Shows the fuzzer catches three known bugs: each mutation is applied to a temporary copy of mas_local
(put first on PYTHONPATH; the worktree is never modified), the fuzz test runs in a subprocess with
MAS_FUZZ_REPORT, and its outcomes are compared with the unmutated library's. A mutant is *killed*
when some run that was exact on the unmutated library is wrong or crashes with the mutation (the
engine may already fail other runs; those do not count).

The fuzz runs use ``verify="off"`` by default: the library's self-check corrects a mutant like these (the
batch fails the identity and is computed one sample at a time), so with it on the mutants come out exact;
``--verify first`` shows that too.

    PYTHONPATH=. MAS_LOCAL_NO_EXT=1 python tests/fuzz_mutations.py [--n MODELS] [--verify off|first]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MUTATIONS = {
    "a: [T,B] mask branch ignores the mask when T != B": (
        "mas_local/importance/masks.py",
        "if dim == 1 and t.dim() >= 2 and t.shape[0] == positions and t.shape[1] == n:",
        "if dim == 1 and t.dim() >= 2 and t.shape[0] == positions and t.shape[1] == n and positions == n:",
    ),
    "b: generic rule's chunks all read the first samples": (
        "mas_local/importance/rules/generic.py",
        "out.append(t.narrow(dim, rows.start, rows.stop - rows.start))",
        "out.append(t.narrow(dim, 0, rows.stop - rows.start))",
    ),
    "c: conv Hebbian treats every padding mode as zeros": (
        "mas_local/importance/rules/conv.py",
        'if m.padding_mode == "zeros" and not isinstance(m.padding, str):',
        "if not isinstance(m.padding, str):",
    ),
}


def run_fuzz(pythonpath: str, n: int, report: Path, verify: str = "off") -> int:
    env = dict(
        os.environ,
        PYTHONPATH=pythonpath,
        MAS_FUZZ_N=str(n),
        MAS_FUZZ_REPORT=str(report),
        MAS_LOCAL_NO_EXT="1",
        MAS_FUZZ_VERIFY=verify,
    )
    # cwd outside the worktree and --import-mode=append: the mutant copy first on sys.path stays first
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=append"]
    cmd += ["--rootdir", str(ROOT), str(ROOT / "tests/test_fuzz.py"), "-k", "test_fuzz["]
    return subprocess.run(cmd, env=env, cwd=report.parent, capture_output=True, text=True).returncode


def outcomes(report: Path) -> dict:
    out = {}
    for line in report.read_text().splitlines():
        rec = json.loads(line)
        out[(rec["seed"], rec["run"], rec["converted"])] = rec
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=int(os.environ.get("MAS_FUZZ_N", "60")))
    ap.add_argument("--verify", default="off", choices=("off", "first", "every"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_report = tmp / "baseline.jsonl"
        run_fuzz(str(ROOT), args.n, base_report, args.verify)
        base = outcomes(base_report)
        assert {r["lib"] for r in base.values()} == {str(ROOT / "mas_local")}
        print(f"baseline: {len(base)} runs, {sum(r['outcome'] == 'exact' for r in base.values())} exact")
        killed_all = True
        for i, (name, (rel, old, new)) in enumerate(MUTATIONS.items()):
            pkg = tmp / f"mutant{i}"
            shutil.copytree(ROOT / "mas_local", pkg / "mas_local", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            target = pkg / rel
            text = target.read_text()
            assert text.count(old) == 1, f"{name}: the line to mutate is not in {rel} (once)"
            target.write_text(text.replace(old, new))
            report = tmp / f"mutant{i}.jsonl"
            run_fuzz(f"{pkg}{os.pathsep}{ROOT}", args.n, report, args.verify)
            got = outcomes(report)
            libs = {r["lib"] for r in got.values()}
            assert libs == {str(pkg / "mas_local")}, f"the fuzz run did not import the mutant: {libs}"
            newly = [
                r
                for k, r in got.items()
                if base.get(k, {}).get("outcome") == "exact" and r["outcome"] in ("wrong", "crash")
            ]
            killed = bool(newly)
            killed_all &= killed
            print(f"{'KILLED  ' if killed else 'SURVIVED'} {name}: {len(newly)} runs exact before, failing now")
            for r in newly[:4]:
                conv = " converted" if r["converted"] else ""
                print(f"    seed={r['seed']} {r['run']}{conv} blocks={r['patterns']}: {r.get('error', '')}")
    return 0 if killed_all else 1


if __name__ == "__main__":
    sys.exit(main())
