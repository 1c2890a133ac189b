"""The analysis figures: overlays, t-SNE, per-category norm sweeps, polar diagnostics, training budget."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from PIL import Image, ImageDraw

from polarocc.atomic import save_figure, save_image
from polarocc.deploy.overlay import overlay_panels


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    save_figure(out, fig, dpi=100)
    plt.close(fig)
    return out


def overlay_grid(images: list[np.ndarray], maps: list[np.ndarray], scores: list[float], threshold: float,
                 titles: list[str], out: Path, *, map_scale: Sequence[float] | None = None,
                 normal_scores: Sequence[float] = (), masks: list[np.ndarray | None] | None = None) -> Path:
    """One titled row per image: image | heat map and colour bar | ground truth (where ``masks`` gives one) |
    predicted region, every row on the model's colour scale ``map_scale`` (see :mod:`polarocc.deploy.overlay`)."""
    masks = masks if masks is not None else [None] * len(images)
    rows = [overlay_panels(im, m, threshold, s, map_scale=map_scale, normal_scores=normal_scores, mask=k)
            for im, m, s, k in zip(images, maps, scores, masks, strict=True)]
    width, height = max(row.width for row in rows), max(row.height for row in rows)
    label = 16
    canvas = Image.new("RGB", (width, (height + label) * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (row, title) in enumerate(zip(rows, titles, strict=True)):
        top = i * (height + label)
        draw.text((4, top + 2), title, fill=(0, 0, 0))
        canvas.paste(row, (0, top + label))
    return save_image(out, canvas)


def tsne_plot(projected: dict[str, np.ndarray], anomalous: np.ndarray, title: str, seed: int, out: Path) -> Path:
    """A t-SNE embedding of the projected features per center distribution (paper Fig. S6)."""
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(projected), figsize=(3.6 * len(projected), 3.6), squeeze=False)
    for ax, (distribution, z) in zip(axes[0], projected.items(), strict=True):
        perplexity = min(30.0, max(2.0, (len(z) - 1) / 3))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z.astype(np.float64))
        for flag, colour, name in ((0, "tab:blue", "normal"), (1, "tab:red", "anomalous")):
            ax.scatter(*xy[anomalous == flag].T, s=4, c=colour, alpha=0.6, label=name)
        ax.set_title(f"center: {distribution}")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].legend(markerscale=3, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out)


def nothing_to_plot(out: Path, message: str) -> Path:
    """A small figure that says why it is empty (the stage's output exists whatever the params declare)."""
    fig, ax = plt.subplots(figsize=(5, 1.2))
    ax.set_axis_off()
    ax.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
    return _save(fig, out)


def category_sweep_plot(table: pl.DataFrame, out: Path, metric: str = "image_auroc") -> Path:
    """``metric`` against the center norm, one panel per dataset category, a line per distribution."""
    table = table.filter(pl.col(metric).is_not_null())
    keys = table.select(["dataset", "category"]).unique(maintain_order=True).rows()
    if not keys:
        return nothing_to_plot(out, f"no {metric.replace('_', ' ')} to plot (no dataset has one)")
    cols = 4
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.7 * rows), squeeze=False)
    for ax, (dataset, category) in zip(axes.flat, keys, strict=False):
        part = table.filter((pl.col("dataset") == dataset) & (pl.col("category") == category))
        for distribution in part["distribution"].unique(maintain_order=True).to_list():
            line = part.filter(pl.col("distribution") == distribution).sort("norm")
            ax.plot(line["norm"].to_list(), line[metric].to_list(), marker="o", ms=3, label=distribution)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{dataset}/{category}", fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("center norm ||c||")
    fig.supylabel(metric.replace("_", " "))
    return _save(fig, out)


def polar_plot(polar: pl.DataFrame, out: Path) -> Path:
    """Radius, angle to c and normal/anomalous cosine of projected features against the norm (Fig. 2)."""
    datasets = polar["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(datasets), 3, figsize=(13, 3.4 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        part = polar.filter(pl.col("dataset") == dataset).sort("norm")
        for kind, colour in (("normal", "tab:blue"), ("anomalous", "tab:red")):
            for ax, quantity in zip(row[:2], ("radius", "angle_deg"), strict=True):
                ax.plot(part["norm"], part[f"{kind}_{quantity}_q50"], marker="o", color=colour, label=kind)
                ax.fill_between(part["norm"], part[f"{kind}_{quantity}_q25"], part[f"{kind}_{quantity}_q75"],
                                color=colour, alpha=0.2)
        row[2].plot(part["norm"], part["cosine_normal_anomalous"], marker="o", color="black")
        for ax, label in zip(row, ("radius ||z|| (median, IQR)", "angle(z, c) in degrees", "cos(normal, anomalous)"),
                             strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("center norm ||c||")
            ax.set_title(f"{dataset}: {label}", fontsize=9)
            ax.grid(alpha=0.3)
        row[0].set_yscale("log")
        row[0].legend(fontsize=8)
    return _save(fig, out)


def budget_plot(history: pl.DataFrame, curves: pl.DataFrame, out: Path) -> Path:
    """Per dataset: loss, ||W|| and ||b - c|| per epoch for every norm (default distribution), and test
    AUROC per epoch with and without the bias (analysis only: the reported model is the final epoch)."""
    datasets = history["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(datasets), 4, figsize=(16, 3.3 * len(datasets)), squeeze=False)
    for row, dataset in zip(axes, datasets, strict=True):
        part = history.filter(pl.col("dataset") == dataset)
        for norm in sorted(part["norm"].unique().to_list()):
            line = part.filter(pl.col("norm") == norm).sort("epoch")
            for ax, column in zip(row[:3], ("loss", "weight_norm", "bias_gap"), strict=True):
                ax.plot(line["epoch"], line[column], label=f"||c|| = {norm:g}")
        for ax, title in zip(row[:3], ("training loss", "||W|| (0 = collapse)", "||b - c|| (0 = collapse)"),
                             strict=True):
            ax.set_yscale("log")
            ax.set_title(f"{dataset}: {title}", fontsize=9)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6)
        curve = curves.filter(pl.col("dataset") == dataset)
        for bias, style in ((True, "-"), (False, "--")):
            line = curve.filter(pl.col("bias") == bias).sort("epoch")
            row[3].plot(line["epoch"], line["image_auroc"], style, marker="o", ms=3, label=f"bias {bias}")
        row[3].set_title(f"{dataset}: test image AUROC per epoch (analysis)", fontsize=9)
        row[3].set_xlabel("epoch")
        row[3].grid(alpha=0.3)
        row[3].legend(fontsize=8)
    return _save(fig, out)


def feasibility_plot(feasibility: pl.DataFrame, out: Path) -> Path:
    """Largest tolerated norm against the normal/anomalous cosine similarity, per category (Fig. 4)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for dataset in feasibility["dataset"].unique(maintain_order=True).to_list():
        part = feasibility.filter(pl.col("dataset") == dataset)
        axes[0].scatter(part["cosine_normal_anomalous"], part["tolerated_norm"], label=dataset)
        axes[1].scatter(part["cosine_normal_normal"], part["cosine_normal_anomalous"], label=dataset)
    axes[0].set_yscale("log", base=2)
    axes[0].set_xlabel("cos(normal, anomalous) of pre-trained features")
    axes[0].set_ylabel("largest tolerated norm")
    axes[1].set_xlabel("label-free: cos(normal half A, normal half B)")
    axes[1].set_ylabel("labelled: cos(normal, anomalous)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)
