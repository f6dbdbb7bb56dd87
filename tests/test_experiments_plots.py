"""The comparison's plots and readable layer names, on hand-made results (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from mas_local.experiments import plots  # noqa: E402
from mas_local.experiments.importance_agreement import ESTIMATOR_PAIRS  # noqa: E402
from mas_local.experiments.models import build_model, parameter_labels  # noqa: E402
from mas_local.experiments.report import short_label, table  # noqa: E402

METHODS = ("finetune", "joint", "global-sample", "global-batch", "local-hebbian", "local-sample")


def _results(model, curve: float, chance: float, rho: float = 1.0) -> tuple[dict, list[dict]]:
    """Results as aggregate() shapes them: every method keeps task 1 at ``curve``; ρ = ``rho`` everywhere."""
    t = 3
    mat = np.tril(np.full((t, t), curve)) + np.triu(np.full((t, t), chance), 1)
    ms = {"mean": curve, "std": 0.0}
    methods = {
        m: {
            "summary": {"avg_acc": ms, "bwt": ms, "forgetting": ms, "importance_seconds": ms},
            "acc_matrix_mean": mat.tolist(),
            "task1_curve_mean": [curve] * t,
            "task1_curve_std": [0.0] * t,
            "chosen_lam": [[None, 0.1, 0.1]],
        }
        for m in METHODS
    }
    for m in METHODS:
        methods[m]["summary"].update({"penalty_overhead": None, "penalty_overhead_fused": None})
    params = [n for n, _ in model.named_parameters()]
    labels = parameter_labels(model)
    rng = np.random.default_rng(0)
    omegas = {est: {p: rng.random(q.numel()) for p, q in model.named_parameters()} for est in plots.ESTIMATOR_ORDER}
    spearman = {f"{a} vs {b}": {p: {"mean": rho, "std": 0.0} for p in params} for a, b in ESTIMATOR_PAIRS}
    kinds = sorted({lab["type"] for lab in labels.values()}) + ["whole model"]
    by_type = {f"{a} vs {b}": {k: {"mean": rho, "std": 0.05} for k in kinds} for a, b in ESTIMATOR_PAIRS}
    results = {
        "config": {"benchmark": "split", "tasks": t, "model": "mlp", "epochs": 1, "seeds": 1},
        "tasks": [f"task {i}" for i in range(t)],
        "chance_accuracy": chance,
        "methods": methods,
        "importance_comparison": {
            "spearman": spearman,
            "spearman_by_type": by_type,
            "spearman_by_type_within": {
                pair: {k: {"mean": 0.6, "std": 0.0} for k in kinds if k != "whole model"} for pair in by_type
            },
            "labels": labels,
        },
    }
    return results, [{"params": params, "omegas": omegas}]


def _close(fig):
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_parameter_labels_mlp_cnn_and_multi_head():
    mlp = parameter_labels(build_model("mlp", None, 10))
    hidden, head = {"type": "hidden Linear"}, {"type": "head"}
    assert mlp["body.0.weight"] == {"layer": "layer 1", "module": "Linear 64→256", "tensor": "weight", **hidden}
    assert mlp["body.2.bias"] == {"layer": "layer 2", "module": "Linear 256→256", "tensor": "bias", **hidden}
    assert mlp["head.weight"] == {"layer": "head", "module": "Linear 256→10", "tensor": "weight", **head}
    assert list(mlp) == [n for n, _ in build_model("mlp", None, 10).named_parameters()]
    cnn = parameter_labels(build_model("cnn", 5, 2))
    assert cnn["body.1.weight"]["module"] == "Conv 1→16 3×3"
    conv = {"layer": "layer 2", "module": "Conv 16→32 3×3 stride 2", "tensor": "weight", "type": "conv"}
    assert cnn["body.3.weight"] == conv
    assert cnn["body.6.bias"] == {"layer": "layer 3", "module": "Linear 512→256", "tensor": "bias", **hidden}
    assert cnn["head.weight"]["type"] == "head"
    assert cnn["head.bias"]["module"] == "5 heads × 2, Linear 256→10"
    assert short_label("body.3.weight", cnn) == "layer 2 weight"
    assert short_label("other.weight", cnn) == "other.weight"


def test_task1_axis_is_fixed_and_shows_chance():
    # every method at 100 %: an autoscaled axis would zoom into 98.6-100 and make a flat line look like a drop
    results, _ = _results(build_model("mlp", 3, 2), curve=1.0, chance=0.5)
    fig = plots.task1_accuracy_figure(results)
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert lo == 0 and 100 <= hi <= 105
    chance = [ln for ln in ax.get_lines() if ln.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == 50.0
    _close(fig)


def test_importance_plot_legend_off_the_bars_readable_names_small_row_gap():
    model = build_model("mlp", None, 10)
    results, importance = _results(model, curve=0.9, chance=0.1, rho=1.0)  # every bar reaches the top
    fig = plots.importance_figure(results, importance)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bars_ax, *hists = fig.axes
    legend = bars_ax.get_legend().get_window_extent(renderer)
    assert bars_ax.patches, "no bars drawn"
    for bar in bars_ax.patches:
        assert not legend.overlaps(bar.get_window_extent(renderer)), "the legend covers a bar"
    assert legend.x0 >= bars_ax.get_window_extent(renderer).x1, "the legend is inside the bar chart"
    ticks = [t.get_text() for t in bars_ax.get_xticklabels()]
    assert ticks[0] == "layer 1 weight\nLinear 64→256" and not any("body." in t for t in ticks)
    assert [h.get_title() for h in hists] == [
        "layer 1 weight (Linear 64→256)",
        "layer 2 weight (Linear 256→256)",
        "head weight (Linear 256→10)",
    ]
    # the gap between the bar chart (tick labels included) and the histograms' titles: under a quarter inch
    gap = bars_ax.get_tightbbox(renderer).y0 - max(h.get_tightbbox(renderer).y1 for h in hists)
    assert 0 <= gap < 0.25 * fig.dpi, gap
    _close(fig)


def test_accuracy_matrices_title_gives_chance():
    results, _ = _results(build_model("mlp", 3, 2), curve=1.0, chance=0.5)
    fig = plots.accuracy_matrices_figure(results)
    assert "chance 50%" in fig.get_suptitle()
    _close(fig)


def test_write_all_writes_four_pngs(tmp_path):
    results, importance = _results(build_model("cnn", 3, 2), curve=0.8, chance=0.5, rho=0.3)
    paths = plots.write_all(results, importance, str(tmp_path))
    assert [p.rsplit("/", 1)[-1] for p in paths] == list(plots.FILES)
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table_uses_layer_names():
    results, _ = _results(build_model("mlp", None, 10), curve=0.9, chance=0.1, rho=0.5)
    text = table(results)
    assert "after task 1, per tensor: layer 1 weight 0.50, layer 1 bias 0.50" in text
    assert "per layer type (pooled): head 0.50 ± 0.05, hidden Linear 0.50 ± 0.05, whole model 0.50 ± 0.05" in text
    assert "per layer type (mean within tensors): head 0.60 ± 0.00, hidden Linear 0.60 ± 0.00" in text
    assert "body.0" not in text


def test_agreement_figure_one_group_per_layer_type_and_the_main_pair_first():
    results, _ = _results(build_model("transformer", None, 10), curve=0.9, chance=0.1, rho=-0.2)
    fig = plots.agreement_figure(results)
    ax = fig.axes[0]
    ticks = ["".join(t.get_text().split()) for t in ax.get_xticklabels()]  # labels are wrapped
    kinds = list(results["importance_comparison"]["spearman_by_type"]["global-sample vs local-hebbian"])
    assert ticks == ["".join(k.split()) for k in kinds] and "attentionq/k/v" in ticks and "wholemodel" in ticks
    bars = [p for p in ax.patches]
    assert len(bars) == len(kinds) * len(ESTIMATOR_PAIRS)
    assert all(abs(b.get_height() + 0.2) < 1e-9 for b in bars)
    assert ax.get_ylim()[0] < -0.25  # the negative bars and their error bars are in view
    within = fig.axes[1]  # the second panel: the mean of the per-tensor ρ; "whole model" has none
    heights = [b.get_height() for b in within.patches]
    assert len(heights) == len(bars)
    assert sum(abs(h - 0.6) < 1e-9 for h in heights) == (len(kinds) - 1) * len(ESTIMATOR_PAIRS)
    _close(fig)


def test_within_types_averages_the_per_tensor_rho_of_each_type_then_the_seeds():
    from mas_local.experiments.report import within_types

    labels = {n: {"type": t} for n, t in (("a.weight", "A"), ("a.bias", "A"), ("b.weight", "B"))}
    pair = "x vs y"
    seeds = [
        {"labels": labels, "spearman": {pair: {"a.weight": 0.2, "a.bias": 0.6, "b.weight": float("nan")}}},
        {"labels": labels, "spearman": {pair: {"a.weight": 0.4, "a.bias": 0.8, "b.weight": -0.5}}},
    ]
    out = within_types(seeds)[pair]
    assert out["A"]["mean"] == pytest.approx(0.5) and out["A"]["std"] == pytest.approx(0.1)
    assert math.isnan(out["B"]["mean"])  # seed 0 has no finite ρ for type B: the mean over seeds is NaN


def test_importance_figure_stays_readable_on_the_transformer():
    results, importance = _results(build_model("transformer", None, 10), curve=0.9, chance=0.1)
    fig = plots.importance_figure(results, importance)
    top, *hists = fig.axes
    n_weights = sum(1 for p in importance[0]["params"] if p.endswith("weight"))
    assert len(top.get_xticklabels()) == n_weights  # weights only: 36 tensors would not fit
    assert 2 <= len(hists) <= plots.MAX_HISTOGRAMS
    assert fig.get_size_inches()[0] < 40
    _close(fig)
