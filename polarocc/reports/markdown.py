"""Markdown rendering of polars tables and the paper-style summary tables."""

from __future__ import annotations

import polars as pl

from polarocc.config import Params
from polarocc.reports.tables import OURS


def md_table(table: pl.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table; floats rounded to ``digits``, missing values as '-'."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "-"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.iter_rows()]
    return "\n".join(lines)


def default_rows(results: pl.DataFrame, params: Params) -> pl.DataFrame:
    """The trained projector at the default center (Protocols A and B) and every peer, per category."""
    ours = results.filter((pl.col("method") == OURS) & (pl.col("protocol") != "C")
                          & (pl.col("distribution") == params.center.distribution)
                          & (pl.col("norm") == float(params.center.norm)))
    return pl.concat([ours, results.filter(pl.col("method") != OURS)])


def headline_table(results: pl.DataFrame, params: Params) -> pl.DataFrame:
    """Mean metrics per dataset and method at the default center, with Protocol C as its own method."""
    online = results.filter(pl.col("protocol") == "C").with_columns(pl.lit("projector, online (C)").alias("method"))
    rows = pl.concat([default_rows(results, params), online])
    return (rows.group_by(["dataset", "method"], maintain_order=True)
            .agg(pl.col("image_auroc").mean(), pl.col("pixel_auroc").mean(), pl.col("aupro").mean(),
                 pl.col("image_f1_max").mean(), pl.col("pixel_f1_max").mean(), pl.len().alias("categories"))
            .sort(["dataset", "method"]))


def distribution_table(results: pl.DataFrame, params: Params) -> pl.DataFrame:
    """Paper Table 4: mean image AUROC per center distribution (rows) and dataset (columns) at the default norm."""
    at_norm = results.filter((pl.col("method") == OURS) & (pl.col("protocol") != "C")
                             & (pl.col("norm") == float(params.center.norm)))
    # Sorted before pivoting: the pivot's column order follows row order, and group_by's is arbitrary.
    means = (at_norm.group_by(["distribution", "dataset"]).agg(pl.col("image_auroc").mean())
             .sort(["dataset", "distribution"]))
    return means.pivot(on="dataset", index="distribution", values="image_auroc").sort("distribution")


def category_table(results: pl.DataFrame, params: Params) -> pl.DataFrame:
    """Paper Table S4: per category, image AUROC / pixel AUROC / AUPRO of each method at the default center."""
    rows = default_rows(results, params)
    wide = None
    for method in rows["method"].unique(maintain_order=True).to_list():
        part = rows.filter(pl.col("method") == method).select(
            "dataset", "category", *[pl.col(k).alias(f"{method} {k.replace('_auroc', '')}")
                                     for k in ("image_auroc", "pixel_auroc", "aupro")])
        wide = part if wide is None else wide.join(part, on=["dataset", "category"], how="left")
    return wide.sort(["dataset", "category"])
