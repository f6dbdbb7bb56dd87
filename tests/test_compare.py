"""The comparison command: metrics on hand-made matrices, the command end to end, bad options."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mas_local as ml
from mas_local.cli import build_parser, main
from mas_local.experiments import metrics, plots
from mas_local.experiments.config import METHODS
from mas_local.experiments.data import make_tasks

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# R[i, j]: accuracy on task j after training task i (percent, so every expected value is exact)
R3 = [[90.0, 10.0, 20.0], [70.0, 80.0, 10.0], [60.0, 85.0, 95.0]]
# task 1 peaks after task 2 (80) and ends at 40; task 2 ends above its learning accuracy
R3_PEAK = [[50.0, 0.0, 0.0], [80.0, 60.0, 0.0], [40.0, 70.0, 90.0]]


# --------------------------------------------------------------------------- metrics


def test_average_accuracy_is_last_row_mean():
    assert metrics.average_accuracy(R3) == 80.0
    assert metrics.average_accuracy([[42.0]]) == 42.0


def test_backward_transfer_exact():
    # ((60 - 90) + (85 - 80)) / 2
    assert metrics.backward_transfer(R3) == -12.5
    # ((40 - 50) + (70 - 60)) / 2
    assert metrics.backward_transfer(R3_PEAK) == 0.0
    assert math.isnan(metrics.backward_transfer([[1.0]]))


def test_forgetting_uses_the_best_earlier_accuracy():
    # task 1: max(90, 70) - 60 = 30; task 2: 80 - 85 = -5
    assert metrics.forgetting(R3) == 12.5
    # task 1: max(50, 80) - 40 = 40; task 2: 60 - 70 = -10  -> BWT says 0, forgetting 15
    assert metrics.forgetting(R3_PEAK) == 15.0
    assert math.isnan(metrics.forgetting([[1.0]]))


def test_no_forgetting_and_learning_accuracy():
    r = np.triu(np.full((4, 4), 0.0)) + np.tril(np.full((4, 4), 75.0))
    assert metrics.backward_transfer(r) == 0.0
    assert metrics.forgetting(r) == 0.0
    assert metrics.learning_accuracy(R3) == pytest.approx((90 + 80 + 95) / 3)
    s = metrics.summarize(R3)
    assert s == {"avg_acc": 80.0, "bwt": -12.5, "forgetting": 12.5, "learning_acc": pytest.approx(265 / 3)}


def test_metrics_reject_non_square():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy([[1.0, 2.0]])
    with pytest.raises(ValueError, match="square"):
        metrics.backward_transfer(np.zeros((2, 3)))


def test_mean_std_population():
    assert metrics.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": 1.0}
    assert metrics.mean_std([5.0]) == {"mean": 5.0, "std": 0.0}


def test_spearman_exact_values():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert metrics.spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert metrics.spearman(x, -(x**3)) == pytest.approx(-1.0)
    # ranks of y: [1, 2, 3.5, 5, 3.5], centred [-2, -1, .5, 2, .5]; with [-2..2]: 8 / sqrt(10 * 9.5)
    y = np.array([5.0, 6.0, 7.0, 8.0, 7.0])
    assert metrics.spearman(x, y) == pytest.approx(8 / math.sqrt(10 * 9.5))
    assert math.isnan(metrics.spearman(x, np.ones(5)))
    with pytest.raises(ValueError, match="length"):
        metrics.spearman(x, x[:3])


# --------------------------------------------------------------------------- data


def test_tasks_are_deterministic_and_split_is_multi_head():
    a = make_tasks("permuted", 3, seed=0)
    b = make_tasks("permuted", 3, seed=0)
    for ta, tb in zip(a, b):
        assert torch.equal(ta.x["train"], tb.x["train"])
    # task 1 keeps the pixel order, later tasks permute the same images
    assert not torch.equal(a[0].x["train"], a[1].x["train"])
    assert torch.equal(a[0].x["train"].sort(1).values, a[1].x["train"].sort(1).values)
    sizes = {k: v.shape[0] for k, v in a[0].x.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > sizes["val"] > 0
    split = make_tasks("split", 5, seed=1)
    assert [t.head for t in split] == [0, 1, 2, 3, 4]
    assert all(set(t.y["test"].unique().tolist()) == {0, 1} for t in split)
    rot = make_tasks("rotated", 2, seed=0)
    assert rot[1].x["train"].shape == rot[0].x["train"].shape


# --------------------------------------------------------------------------- the command


def _run(tmp_path, *extra: str) -> dict:
    out = tmp_path / "out"
    args = ["compare", "--seeds", "1", "--tasks", "2", "--epochs", "1", "--quiet", "--out", str(out), *extra]
    assert main(args) == 0
    with open(out / "results.json") as f:
        return json.load(f), out


def _check_pngs(out) -> None:
    for name in plots.FILES:
        path = out / name
        assert path.exists() and path.stat().st_size > 1000, name
        assert path.read_bytes()[:8] == PNG_MAGIC


def test_command_baselines_without_mas(tmp_path, capsys):
    res, out = _run(tmp_path, "--methods", "finetune,joint")
    assert set(res["methods"]) == {"finetune", "joint"}
    for m in res["methods"].values():
        assert np.array(m["acc_matrix_mean"]).shape == (2, 2)
    _check_pngs(out)
    assert "finetune" in capsys.readouterr().out


def test_command_end_to_end_all_methods(tmp_path, capsys):
    res, out = _run(tmp_path, "--lam-grid", "0.1,10")
    json.dumps(res, allow_nan=False)  # strictly valid JSON: no NaN/Infinity
    assert {"config", "tasks", "methods", "importance_comparison", "environment", "metric_definitions"} <= set(res)
    assert set(res["methods"]) == set(METHODS)
    assert res["config"]["lam_grid"] == [0.1, 10.0]
    for name, m in res["methods"].items():
        assert np.array(m["acc_matrix_mean"]).shape == (2, 2)
        assert len(m["per_seed"]) == 1
        rec = m["per_seed"][0]
        assert np.array(rec["acc_matrix"]).shape == (2, 2)
        assert 0.0 <= rec["metrics"]["avg_acc"] <= 1.0
        if name in ("finetune", "joint"):
            assert rec["chosen_lam"] == [None, None]
        else:
            assert rec["chosen_lam"][0] is None and rec["chosen_lam"][1] in (0.1, 10.0)
            assert set(rec["lam_val_scores"][1]) == {"0.1", "10.0"}
            assert len(rec["consolidate_seconds"]) == 2
            assert m["summary"]["penalty_overhead"]["mean"] is not None
    rho = res["importance_comparison"]["spearman"]["global-sample vs local-hebbian"]
    assert set(rho) == {"body.0.weight", "body.0.bias", "body.2.weight", "body.2.bias", "head.weight", "head.bias"}
    labels = res["importance_comparison"]["labels"]
    assert set(labels) == set(rho) and labels["body.2.weight"]["module"] == "Linear 256→256"
    assert res["chance_accuracy"] == 0.1
    _check_pngs(out)
    text = capsys.readouterr().out
    assert "local-hebbian" in text and "global-sample" in text
    assert "layer 1 weight" in text and "body.0" not in text


def test_command_split_cnn_multi_head(tmp_path):
    res, out = _run(
        tmp_path,
        "--benchmark",
        "split",
        "--model",
        "cnn",
        "--lam-grid",
        "1",
        "--methods",
        "joint,global-sample,local-hebbian",
    )
    assert res["tasks"] == ["digits 0/1", "digits 2/3"]
    assert res["chance_accuracy"] == 0.5  # one 2-way head per task
    for m in res["methods"].values():
        acc = np.array(m["acc_matrix_mean"])
        assert acc.shape == (2, 2) and acc[1, 1] > 0.6  # a 2-way task learnt in one epoch
    _check_pngs(out)


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "mas_local", "compare", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 0
    for opt in (
        "--seeds",
        "--tasks",
        "--epochs",
        "--model",
        "--benchmark",
        "--lam-grid",
        "--methods",
        "--out",
        "--device",
        "--batch-size",
        "--lr",
        "--threads",
        "--no-plots",
        "--quiet",
    ):
        assert opt in proc.stdout


def _compare_options() -> set[str]:
    import re

    text = build_parser().compare_parser.format_help()
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text)) - {"--help"}


def test_readme_and_docs_list_every_option():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index("## Global vs local MAS on real digits")
    section = readme[start : readme.index("\n## ", start + 1)]
    with open(os.path.join(root, "docs", "compare.md"), encoding="utf-8") as f:
        docs = f.read()
    options = _compare_options()
    assert {"--lam-grid", "--batch-size", "--lr", "--threads", "--no-plots", "--quiet"} <= options
    for opt in sorted(options):
        assert f"`{opt}" in section, f"README's compare section does not list {opt}"
        assert f"| `{opt}" in docs, f"docs/compare.md's option table does not list {opt}"
    assert "mas-local --version" in section


# --------------------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "finetune,ewc"], "unknown method(s) ewc"),
        (["--methods", ","], "comma-separated list of methods"),
        (["--tasks", "1"], "--tasks must be at least 2"),
        (["--seeds", "0"], "--seeds must be at least 1"),
        (["--lam-grid", "1,abc"], "'abc' is not a number"),
        (["--lam-grid", "1,-2"], "must be finite and >= 0, got -2 (λ is a value, not an exponent"),
        (["--lam-grid", "1,nan"], "must be finite and >= 0"),
        (["--lam-grid", "1,1"], "lists a value twice"),
        # a value starting with "-" is written --opt=VALUE (argparse reads "-1,1" as an option otherwise)
        (["--lam-grid=-1,1"], "must be finite and >= 0, got -1 (λ is a value, not an exponent"),
        (["--lam-grid", "-1,1"], "--lam-grid: expected one argument"),
        (["--lam-grid=-inf"], "must be finite and >= 0, got -inf"),
        (["--lr=-1e-3"], "--lr must be positive, got -0.001"),
        (["--lam-grid", "--quiet"], "--lam-grid: expected one argument"),
        (["--benchmark", "split", "--tasks", "6"], "at most 5 tasks"),
        (["--model", "resnet"], "invalid choice"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--epochs", "x"], "--epochs: invalid int value: 'x'"),
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--threads", "0"], "--threads must be at least 1"),
        (["--batch-size", "0"], "batch sizes must be at least 1"),
    ],
)
def test_bad_options_exit_with_message(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert not (tmp_path / "results.json").exists()


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mas-local {ml.__version__}"


def test_unwritable_out_folder(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(blocker / "sub")])
    assert exc.value.code == 2
    assert "cannot create the --out folder" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_for_but_absent(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--device", "cuda", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "choose a command" in capsys.readouterr().err
