"""The four PNGs of ``mas-local compare`` (matplotlib, Agg backend, imported only when plotting).

Each ``*_figure`` function builds a figure from the results dict (see
:func:`~.report.aggregate`); :func:`write_all` saves them. docs/compare.md ("Plots")
says how to read them.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np

FILES = (
    "accuracy_matrices.png",
    "task1_accuracy.png",
    "importance_global_vs_local.png",
    "agreement_by_layer_type.png",
)
MAX_TENSOR_BARS = 12  # more tensors than this (the transformer): bars for the weights only
MAX_HISTOGRAMS = 6
ESTIMATOR_ORDER = ("global-sample", "global-batch", "local-hebbian", "local-sample")
DPI = 110


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _chance_percent(results: dict) -> float | None:
    chance = results.get("chance_accuracy")
    return None if chance is None else 100.0 * chance


def accuracy_matrices_figure(results: dict):
    """Mean test-accuracy matrix of every method, side by side."""
    plt = _plt()
    methods = list(results["methods"])
    n = len(methods)
    t = len(results["tasks"])
    fig, axes = plt.subplots(1, n, figsize=(2.2 * n + 1.0, 2.9), squeeze=False, layout="constrained")
    im = None
    for ax, m in zip(axes[0], methods):
        mat = np.array(results["methods"][m]["acc_matrix_mean"], dtype=float) * 100
        im = ax.imshow(mat, vmin=0, vmax=100, cmap="viridis")
        for i in range(t):
            for j in range(t):
                v = mat[i, j]
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=7, color="white" if v < 60 else "black")
        s = results["methods"][m]["summary"]["avg_acc"]
        ax.set_title(f"{m}\navg {s['mean'] * 100:.1f}%", fontsize=9)
        ax.set_xticks(range(t), [str(j + 1) for j in range(t)], fontsize=7)
        ax.set_yticks(range(t), [str(i + 1) for i in range(t)], fontsize=7)
        ax.set_xlabel("evaluated on task", fontsize=8)
    axes[0][0].set_ylabel("after training task", fontsize=8)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), shrink=0.8, label="test accuracy %")
    chance = _chance_percent(results)
    note = f"; chance {chance:.0f}%" if chance is not None else ""
    fig.suptitle(f"Accuracy matrices (mean over seeds{note})", fontsize=10)
    return fig


def task1_accuracy_figure(results: dict):
    """Test accuracy on task 1 after each task, mean ± std over seeds, one line per method.

    The y-axis is fixed at 0–100 % (so a flat line near 100 % reads as "nothing forgotten",
    not as a zoomed-in wiggle) with the benchmark's chance level drawn for reference.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    styles = ["-", "--", "-.", ":"]
    markers = ["o", "s", "^", "v", "D", "x"]
    for k, (m, r) in enumerate(results["methods"].items()):
        mean = np.array(r["task1_curve_mean"], dtype=float) * 100
        std = np.array(r["task1_curve_std"], dtype=float) * 100
        x = np.arange(1, len(mean) + 1)
        # distinct line styles and markers: methods with equal curves stay visible
        ax.plot(x, mean, ls=styles[k % len(styles)], marker=markers[k % len(markers)], ms=4, label=m)
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    chance = _chance_percent(results)
    if chance is not None:
        ax.axhline(chance, color="grey", lw=0.8, ls=":", label=f"chance ({chance:.0f}%)")
    ax.set_ylim(0, 102)
    ax.set_yticks(range(0, 101, 20))
    ax.set_xlabel("after training task")
    ax.set_ylabel("accuracy on task 1 (%)")
    ax.set_xticks(range(1, len(results["tasks"]) + 1))
    ax.set_title("Remembering task 1", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def _tick_label(param: str, labels: dict) -> str:
    """``layer 1 weight`` over its module (``Linear 64→256``), wrapped to fit under a bar group."""
    lab = labels.get(param)
    if not lab:
        return param
    return f"{lab['layer']} {lab['tensor']}\n" + textwrap.fill(lab["module"], width=15)


def importance_figure(results: dict, importance: list[dict]):
    """Spearman ρ of Ω per parameter tensor for the estimator pairs (top), log10 Ω histograms per weight (bottom)."""
    plt = _plt()
    imp = results.get("importance_comparison")
    if not imp or not importance:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no MAS method was run: no importance to compare", ha="center", va="center")
        return fig
    first = importance[0]
    labels = imp.get("labels") or {}
    params = list(first["params"])
    weights = [p for p in params if p.endswith("weight")] or params
    if len(params) > MAX_TENSOR_BARS:
        params = weights
    # histograms: every weight of a small model; one weight per layer type of a large one
    shown, kinds = [], set()
    for p in weights:
        kind = labels.get(p, {}).get("type", p)
        if len(weights) <= MAX_HISTOGRAMS or kind not in kinds:
            shown.append(p)
            kinds.add(kind)
    weights = shown[:MAX_HISTOGRAMS]
    ncol = max(2, len(weights))
    fig = plt.figure(figsize=(max(3.0 * ncol, 1.1 * len(params)), 6.0), layout="constrained")
    gs = fig.add_gridspec(2, ncol, height_ratios=[1.1, 1.0])
    ax = fig.add_subplot(gs[0, :])
    pairs = list(imp["spearman"])
    width = 0.8 / max(1, len(pairs))
    x = np.arange(len(params))
    for k, pair in enumerate(pairs):
        vals = [imp["spearman"][pair].get(p, {"mean": None, "std": None}) for p in params]
        mean = [v["mean"] if v["mean"] is not None else np.nan for v in vals]
        std = [v["std"] if v["std"] is not None else 0.0 for v in vals]
        ax.bar(x + (k - (len(pairs) - 1) / 2) * width, mean, width, yerr=std, label=pair, capsize=2)
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(x, [_tick_label(p, labels) for p in params], fontsize=7)
    lows = [
        v["mean"] - (v["std"] or 0.0)
        for pair in pairs
        for v in imp["spearman"][pair].values()
        if v["mean"] is not None and not np.isnan(v["mean"])
    ]
    ax.set_ylim(min([0.0, *lows]) - 0.05, 1.05)  # every bar and its error bar in view
    ax.set_ylabel("Spearman ρ of Ω")
    ax.set_title(
        "Rank agreement of the estimators per parameter tensor (model after task 1, mean ± std over seeds)", fontsize=9
    )
    # beside the bars, not on them: every bar may reach ρ = 1
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, title="pair", title_fontsize=7)
    for c, p in enumerate(weights[:ncol]):
        hx = fig.add_subplot(gs[1, c])
        for k, est in enumerate(ESTIMATOR_ORDER):
            om = first["omegas"].get(est, {}).get(p)
            if om is None:
                continue
            pos = om[om > 0]
            if pos.size == 0:
                continue
            zeros = 1.0 - pos.size / max(1, om.size)
            label = est + (f" ({zeros:.0%} zero)" if zeros > 0.005 else "")
            hx.hist(
                np.log10(pos), bins=40, histtype="step", label=label, density=True, ls=["-", "-", "-", "--"][k], lw=1.2
            )
        lab = labels.get(p)
        hx.set_title(f"{lab['layer']} {lab['tensor']} ({lab['module']})" if lab else p, fontsize=8)
        hx.set_xlabel("log10 Ω", fontsize=8)
        hx.tick_params(labelsize=7)
        if c == 0:
            hx.set_ylabel("density (seed 0)", fontsize=8)
        hx.legend(fontsize=6)
    return fig


def _wrap(label: str, width: int = 12) -> str:
    """Break a tick label between words, and a long word after a slash (``embeddings/`` ``positions``)."""
    pieces: list[str] = []
    for word in label.split(" "):
        if len(word) > width and "/" in word:
            head, _, tail = word.partition("/")
            pieces += [head + "/", tail]
        else:
            pieces.append(word)
    lines = [pieces[0]]
    for piece in pieces[1:]:
        joiner = "" if lines[-1].endswith("/") else " "
        if len(lines[-1]) + len(joiner) + len(piece) <= width and not lines[-1].endswith("/"):
            lines[-1] += joiner + piece
        else:
            lines.append(piece)
    return "\n".join(lines)


def agreement_figure(results: dict):
    """Spearman ρ of Ω per layer type for each estimator pair, mean ± std over seeds: top, every parameter of
    the type pooled (the tensors' scales count); bottom, the mean of the per-tensor ρ (the ranking within
    each tensor)."""
    plt = _plt()
    imp = results.get("importance_comparison") or {}
    by_type = imp.get("spearman_by_type") or {}
    if not by_type:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no MAS method was run: no importance to compare", ha="center", va="center")
        return fig
    panels = [("spearman_by_type", "pooled per type")]
    if imp.get("spearman_by_type_within"):
        panels.append(("spearman_by_type_within", "mean within tensors"))
    pairs = list(by_type)
    kinds = list(by_type[pairs[0]])
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(max(6.0, 1.25 * len(kinds) + 2.5), 3.4 * len(panels)), layout="constrained"
    )
    axes = np.atleast_1d(axes)
    width = 0.8 / len(pairs)
    x = np.arange(len(kinds))
    for ax, (key, what) in zip(axes, panels):
        lows = [0.0]
        for k, pair in enumerate(pairs):
            vals = [imp[key].get(pair, {}).get(kind) or {"mean": None, "std": None} for kind in kinds]
            mean = np.array([v["mean"] if v["mean"] is not None else np.nan for v in vals], dtype=float)
            std = np.array([v["std"] if v["std"] is not None else 0.0 for v in vals], dtype=float)
            # the paper's question (global vs Hebbian) stands out; the other pairs are context
            main = pair == "global-sample vs local-hebbian"
            ax.bar(
                x + (k - (len(pairs) - 1) / 2) * width,
                mean,
                width,
                yerr=std,
                capsize=2,
                label=pair,
                alpha=1.0 if main else 0.55,
                edgecolor="black" if main else None,
                lw=0.6,
            )
            lows.extend((mean - std)[~np.isnan(mean)])
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x, [_wrap(kind) for kind in kinds], fontsize=8)
        ax.set_ylim(min(lows) - 0.05, 1.05)
        ax.set_ylabel(f"Spearman ρ of Ω\n({what})", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    cfg = results.get("config", {})
    axes[0].set_title(
        f"Where local importance tracks global importance: {cfg.get('model', '')} after task 1, "
        f"mean ± std over {cfg.get('seeds', '?')} seed(s)",
        fontsize=9,
    )
    axes[0].legend(
        fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), frameon=False, title="pair", title_fontsize=7
    )
    return fig


def write_all(results: dict, importance: list[dict], out: str) -> list[str]:
    """Write the four PNGs into ``out``; returns their paths."""
    plt = _plt()
    os.makedirs(out, exist_ok=True)
    figures = (
        accuracy_matrices_figure(results),
        task1_accuracy_figure(results),
        importance_figure(results, importance),
        agreement_figure(results),
    )
    paths = []
    for name, fig in zip(FILES, figures):
        path = os.path.join(out, name)
        fig.savefig(path, dpi=DPI, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)
    return paths
