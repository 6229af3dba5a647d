"""PNG figures for the analyses; each takes the JSON-ready dict its analysis returns.

Figures are built on `matplotlib.figure.Figure`, which renders with the Agg backend
without touching pyplot's global state, so importing this module never switches the
backend of a notebook or another library in the same process. Files are written to
a temporary name in the target directory and moved into place (`ncft.io`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ncft.analysis.neft_stats import CATEGORIES
from ncft.io import atomic_file

_ANNOTATE_MAX = 12  # write values into heatmap cells up to this many rows/columns


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write `fig` as PNG to `path` atomically and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return target


def _array(m: Sequence[Sequence[float | None]]) -> np.ma.MaskedArray:
    a = np.array([[np.nan if v is None else v for v in row] for row in m], dtype=float)
    return np.ma.masked_invalid(a)


def _heatmap(
    fig: Figure,
    ax: Any,
    matrix: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    cbar: str,
    cmap: str = "viridis",
    vmin: float | None = None,
    vmax: float | None = None,
) -> None:
    """Draw a labelled heatmap; missing (None) cells are grey and marked "n/a"."""
    a = _array(matrix)
    cm = _cmap(cmap)
    im = ax.imshow(a, cmap=cm, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)), labels=cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, label=cbar)
    if max(len(rows), len(cols)) > _ANNOTATE_MAX:
        return
    lo, hi = im.get_clim()
    mask = np.ma.getmaskarray(a)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            if mask[i, j]:
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
                continue
            v = float(a[i, j])
            frac = 0.5 if hi <= lo else min(max((v - lo) / (hi - lo), 0.0), 1.0)
            r, g, b, _ = cm(frac)
            # Dark text on light cells and vice versa (perceived luminance).
            color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)


def _cmap(name: str) -> Any:
    return colormaps[name].with_extremes(bad="lightgrey")


def plot_iou(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Whole-model IoU heatmap, plus mean off-diagonal IoU per layer when known."""
    per_layer = data["layers"] and len(data["tasks"]) > 1
    fig = Figure(figsize=(11 if per_layer else 6, 5), layout="constrained")
    axes = fig.subplots(1, 2 if per_layer else 1, squeeze=False)[0]
    tasks = data["tasks"]
    _heatmap(
        fig, axes[0], data["whole"], tasks, tasks, title="Neuron overlap (IoU), whole model",
        xlabel="task", ylabel="task", cbar="IoU", vmin=0.0, vmax=1.0,
    )
    if per_layer:
        y = [np.nan if v is None else v for v in data["mean_offdiag_per_layer"]]
        axes[1].plot(data["layers"], y, marker="o")
        axes[1].set(
            title="Mean IoU between different tasks, per layer", xlabel="layer",
            ylabel="mean off-diagonal IoU", ylim=(0, 1),
        )
        axes[1].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[1].grid(alpha=0.3)
    return save_figure(fig, path)


def _task_matrix_panels(
    panels: list[tuple[str, Any]],
    tasks: list[str],
    ylabel: str,
    cbar: str,
    title: str,
    path: str | os.PathLike[str],
) -> Path:
    """Side-by-side task x task heatmaps of signed changes, one colour scale for all.

    The scale is symmetric about 0 (the largest |value| of any panel), so a colour
    means the same change in every panel.
    """
    vals = [abs(v) for _, m in panels for row in m for v in row if v is not None]
    lim = max(vals, default=1.0) or 1.0
    fig = Figure(figsize=(6 * len(panels), 5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel_title, m) in zip(axes, panels):
        _heatmap(
            fig, ax, m, tasks, tasks, title=panel_title, xlabel="evaluated task j",
            ylabel=ylabel, cbar=cbar, cmap="RdBu_r", vmin=-lim, vmax=lim,
        )
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_deactivation(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Relative-drop heatmaps: task neurons off, and random neurons off if present."""
    panels = [("Task i's neurons off", data["drop"])]
    if data.get("random_drop") is not None:
        panels.append(("Random neurons off (same size as task i's)", data["random_drop"]))
    return _task_matrix_panels(
        panels, data["tasks"], ylabel="neurons switched off: task i",
        cbar="relative score drop",
        title="Deactivation: relative drop (baseline - off) / baseline", path=path,
    )


def plot_finetune_matrix(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Change-vs-zero-shot heatmaps: task i's neurons trained, and random neurons."""
    panels = [("Task i's neurons trained", data["change"]),
              ("Random neurons trained (same size)", data["random_change"])]
    return _task_matrix_panels(
        panels, data["tasks"], ylabel="neurons trained: task i", cbar="score - zero-shot",
        title="Fine-tuning matrix: change from the zero-shot score", path=path,
    )


def plot_accuracy_matrix(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heatmap of a[i][j], the score on task i after training task j."""
    tasks = data["tasks"]
    n = len(tasks)
    fig = Figure(figsize=(max(5.0, 0.6 * n + 3), max(4.0, 0.5 * n + 2)), layout="constrained")
    ax = fig.subplots()
    _heatmap(
        fig, ax, data["matrix"], tasks, [f"after {t}" for t in tasks],
        title="Score matrix a[i][j]", xlabel="after training task j",
        ylabel="evaluated task i", cbar="score",
    )
    return save_figure(fig, path)


def plot_forgetting(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """FG_j per stage (else retention) and the mean score seen so far.

    FG is eq. 5 against a per-task reference; without one the curve is the retention
    against the run's own diagonal, labelled as such.
    """
    tasks, a = data["tasks"], _array(data["matrix"])
    x = np.arange(len(tasks))
    eq5 = data.get("fg") is not None
    ratio = data["fg"] if eq5 else data["kept"]
    fg = [np.nan if v is None else v for v in ratio]
    # Mean over the tasks trained so far: the curve AP is the last point of.
    seen = [float(a[: j + 1, j].mean()) if a[: j + 1, j].count() else np.nan for j in x]
    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    label = ("FG_j = mean a[i][j] / A_i, i < j (eq. 5)" if eq5
             else "retention = mean a[i][j] / a[i][i], i < j (not FG: no per-task reference)")
    ax.plot(x, fg, marker="o", color="C0", label=label)
    ax.set_xticks(x, labels=[f"{j}: {t}" for j, t in zip(x, tasks)], rotation=30, ha="right")
    ax.set(title="Forgetting per stage", xlabel="stage j (task just trained)")
    ax.set_ylabel("FG_j (retention ratio)" if eq5 else "retention ratio", color="C0")
    ax.grid(alpha=0.3)
    # Scores may be on another scale (e.g. 0-100) than the ratio, so they get their own axis.
    ax2 = ax.twinx()
    ax2.plot(x, seen, marker="s", linestyle="--", color="C1", label="mean score on tasks 0..j")
    ax2.set_ylabel("mean score on tasks 0..j", color="C1")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_layer_similarity(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """One line per task pair (i < j) of per-layer similarity, and their mean."""
    tasks, layers, per = data["tasks"], data["layers"], data["per_layer"]
    pairs = [(i, j) for i in range(len(tasks)) for j in range(i + 1, len(tasks))]
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    curves = np.array([[np.nan if v is None else v for v in per[i][j]] for i, j in pairs])
    for (i, j), y in zip(pairs, curves):
        label = f"{tasks[i]} / {tasks[j]}" if len(pairs) <= 10 else None
        ax.plot(layers, y, marker=".", alpha=0.6 if len(pairs) > 1 else 1.0, label=label)
    if len(pairs) > 1:
        # Mean over the pairs that have a value; np.nanmean would warn on empty layers.
        have = ~np.isnan(curves)
        total = np.where(have, curves, 0.0).sum(axis=0)
        mean = np.divide(total, have.sum(axis=0), out=np.full(total.shape, np.nan),
                         where=have.any(axis=0))
        ax.plot(layers, mean, color="black", lw=2.5, label="mean over pairs")
    ax.set(
        title=f"Task-neuron parameter similarity per layer (method: {data['method']})",
        xlabel="layer", ylabel="cosine similarity",
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if pairs:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_paper_similarity(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Leng & Xiong Fig. 3: per test task T_j, similarity per layer averaged over M_i, i != j."""
    tasks, layers, per = data["tasks"], data["layers"], data["per_layer"]
    n = len(tasks)
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for j in range(n):
        curves = np.array([[np.nan if v is None else v for v in per[i][j]]
                           for i in range(n) if i != j] or [[np.nan] * len(layers)])
        have = ~np.isnan(curves)
        total = np.where(have, curves, 0.0).sum(axis=0)
        mean = np.divide(total, have.sum(axis=0), out=np.full(total.shape, np.nan),
                         where=have.any(axis=0))
        ax.plot(layers, mean, marker=".", label=f"T_j = {tasks[j]}")
    ax.set(title="Similarity of P_i and P_j inside M_i, mean over i != j (paper protocol)",
           xlabel="layer", ylabel="cosine similarity")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if n <= 12:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_correlation(
    data: dict[str, Any],
    path: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
) -> Path:
    """Scatter of similarity vs generalization with Pearson and Spearman r in the title."""
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(data["x"], data["y"])
    if tasks is not None and len(data["x"]) <= 30:
        for (i, j), x, y in zip(data["pairs"], data["x"], data["y"]):
            ax.annotate(f"{tasks[i]}\u2192{tasks[j]}", (x, y), fontsize=7, alpha=0.8)

    def fmt(d: dict[str, Any]) -> str:
        return "n/a" if d["r"] is None else f"{d['r']:.2f} (p={d['p']:.2g})"

    ax.set(
        title=f"Pearson r = {fmt(data['pearson'])}, Spearman rho = {fmt(data['spearman'])}",
        xlabel="task-neuron similarity", ylabel="generalization score",
    )
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_rank_shift(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Stacked histogram of rank shift by category, and category counts."""
    edges = np.array(data["hist"]["edges"])
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_h, ax_b = fig.subplots(1, 2)
    bottom = np.zeros(len(edges) - 1)
    for name in CATEGORIES:
        counts = np.array(data["hist"]["counts"][name])
        ax_h.bar(edges[:-1], counts, width=np.diff(edges), bottom=bottom, align="edge", label=name)
        bottom += counts
    tau = data["shift_threshold"]
    for x in (-tau, tau):
        ax_h.axvline(x, color="black", linestyle=":", lw=1)
    ax_h.set(
        title=f"Utilization rank shift (scope: {data['scope']}, tau = {tau:g})",
        xlabel="normalized rank shift (+ = more utilized after)", ylabel="rows",
    )
    ax_h.legend(fontsize=8)
    x = np.arange(len(CATEGORIES))
    sel = [data["counts"][c]["selected"] for c in CATEGORIES]
    unsel = [data["counts"][c]["unselected"] for c in CATEGORIES]
    # Neutral colours: the category colours of the histogram mean something else.
    ax_b.bar(x - 0.2, sel, width=0.4, color="dimgray", label="selected (trained)")
    ax_b.bar(x + 0.2, unsel, width=0.4, color="silver", label="not selected")
    ax_b.set_xticks(x, labels=[c.replace("_", "\n") for c in CATEGORIES])
    ax_b.set(title="Neuron categories", ylabel="rows")
    for a in (ax_h, ax_b):
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_b.legend(fontsize=8)
    return save_figure(fig, path)


def plot_neft_utilization(data: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """NeFT Fig. 3: Avg(|ΔRank|) per Pearson-percentile bucket; and the categories."""
    b = data["buckets"]
    edges = b["edges_pct"]
    labels = [f"{lo:g}-{hi:g}%" for lo, hi in zip(edges[:-1], edges[1:])]
    vals = [np.nan if v is None else v for v in b["avg_abs_delta_rank"]]
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax_b, ax_c = fig.subplots(1, 2, width_ratios=[2, 1])
    x = np.arange(len(labels))
    ax_b.bar(x, vals, color="steelblue")
    for xi, n in zip(x, b["count"]):
        ax_b.annotate(f"n={n}", (xi, 0), ha="center", va="bottom", fontsize=7)
    ax_b.set_xticks(x, labels=labels, rotation=30, ha="right")
    ax_b.set(title="Avg(|ΔRank|) by max-Pearson percentile (before training)",
             xlabel="top percentile of the Pearson scores", ylabel="Avg(|ΔRank|)")
    names = ["strongly_affected", "suppressed", "indirectly_affected"]
    counts = [data["counts"][k] for k in names]
    ax_c.bar(np.arange(3), counts, color=["firebrick", "darkorange", "goldenrod"])
    ax_c.set_xticks(np.arange(3), labels=[k.replace("_", "\n") for k in names])
    ax_c.set(title=f"|ΔRank| > {data['strong_threshold']:.1f} of {data['num_neurons']}",
             ylabel="neurons")
    ax_c.set_ylim(0, max(1, *counts) * 1.1)
    ax_c.yaxis.set_major_locator(MaxNLocator(integer=True))
    return save_figure(fig, path)
