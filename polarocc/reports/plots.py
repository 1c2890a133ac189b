"""Plots people would rather see than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import polars as pl

from polarocc.atomic import save_figure


def norm_sweep_plot(means: pl.DataFrame, out: Path, default_norm: float | None = None) -> Path:
    """Mean image and pixel AUROC against the center norm, a line per distribution, a row per dataset."""
    datasets = means["dataset"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(len(datasets), 2, figsize=(10, 3.6 * len(datasets)), squeeze=False)
    for row, dataset in enumerate(datasets):
        ds = means.filter(pl.col("dataset") == dataset)
        for col, metric in enumerate(("image_auroc", "pixel_auroc")):
            ax = axes[row][col]
            if ds[metric].null_count() == ds.height:  # Protocol A has no pixel metric
                ax.set_axis_off()
                continue
            for distribution in ds["distribution"].unique(maintain_order=True).to_list():
                part = ds.filter(pl.col("distribution") == distribution).sort("norm")
                ax.plot(part["norm"].to_list(), part[metric].to_list(), marker="o", label=distribution)
            if default_norm is not None:
                ax.axvline(default_norm, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("center norm ||c||")
            ax.set_ylabel(metric.replace("_", " "))
            ax.set_title(f"{dataset}: {metric.replace('_', ' ')}")
            ax.grid(alpha=0.3)
        axes[row][0].legend(title="center", fontsize=8)
    fig.tight_layout()
    save_figure(out, fig, dpi=110)
    plt.close(fig)
    return out


def learning_curve_plot(curve: pl.DataFrame, out: Path) -> Path:
    """Test image and pixel AUROC against normal images seen (Protocol C), a line per category, mean in black."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for col, metric in enumerate(("image_auroc", "pixel_auroc")):
        ax = axes[0][col]
        for category in curve["category"].unique(maintain_order=True).to_list():
            part = curve.filter(pl.col("category") == category).sort("seen")
            style = {"color": "black", "lw": 2.2} if category == "mean" else {"lw": 1, "alpha": 0.8}
            ax.plot(part["seen"].to_list(), part[metric].to_list(), marker="o", ms=3, label=category, **style)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("normal training images seen (batch 1, one pass)")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_title(f"{curve['dataset'][0]}: {metric.replace('_', ' ')} (Protocol C)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(out, fig, dpi=110)
    plt.close(fig)
    return out
