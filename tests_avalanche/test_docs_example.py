"""The Avalanche example of docs/integrations.md runs as written, and prints what the docs say it prints."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "### Example: SplitMNIST from the bundled digits"


def example_block() -> str:
    text = (ROOT / "docs" / "integrations.md").read_text()
    match = re.search(r"```python\n(.*?)```", text[text.index(HEADING) :], re.S)
    assert match, f"no python block after {HEADING!r}"
    return match.group(1)


def test_the_splitmnist_example_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(example_block(), "<docs/integrations.md example>", "exec"), {"__name__": "__docs_example__"})
    printed = capsys.readouterr().out
    print(printed)
    rows = {}
    for line in printed.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("Naive"):
            rows[cells[0]] = tuple(float(c) for c in cells[1:])
    assert list(rows) == [
        "Naive",
        "Naive + MASAvalanchePlugin(lam=0.03)",
        "Naive + MASAvalanchePlugin.like_mas_plugin(0.1)",
        "Naive + MASPlugin(lambda_reg=0.1)",
    ]
    preset, avalanche = (
        rows["Naive + MASAvalanchePlugin.like_mas_plugin(0.1)"],
        rows["Naive + MASPlugin(lambda_reg=0.1)"],
    )
    assert preset[:2] == avalanche[:2]  # accuracy and forgetting (3 decimals) of the preset are MASPlugin's
    naive_forgetting = rows["Naive"][1]
    assert naive_forgetting > 0.05  # the benchmark forgets without MAS ...
    assert all(rows[name][1] < naive_forgetting / 2 for name in list(rows)[1:])  # ... and much less with it
    assert all(rows[name][2] > 0 for name in list(rows)[1:])  # Ω was timed
    # the accuracies and forgetting the docs print are these (the times vary from run to run)
    docs = (ROOT / "docs" / "integrations.md").read_text()
    for name, (acc, forgetting, _) in rows.items():
        assert f"| {name} | {acc:.3f} | {forgetting:.3f} |" in docs, name
