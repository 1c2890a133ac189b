"""The results table, ``dvc exp show`` metrics, the norm-sweep tables and plot: the first half of the ``report``
stage (the second is :mod:`polarocc.pipeline.report`)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from polarocc import layout
from polarocc.atomic import write_csv, write_json
from polarocc.config import Params
from polarocc.reports.plots import norm_sweep_plot
from polarocc.reports.tables import METRICS, OURS, headline_metrics, results_table, sweep_means

# reports/norm_sweep/<dataset>.csv, the `dvc plots` source: a row per distribution and norm, so the template
# .dvc/plots/norm_sweep.json draws a line per distribution in one plot per dataset.
NORM_SWEEP_DIR = "norm_sweep"
SERIES_COLUMNS = ["dataset", "distribution", "norm", "log2_norm", *METRICS, "categories"]


def norm_sweep_series(means: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """The sweep means split per dataset (file stem -> table), sorted by distribution and norm."""
    means = means.with_columns(pl.col("norm").log(2).alias("log2_norm"))
    return {layout.file_stem(dataset): means.filter(pl.col("dataset") == dataset)
            .select(SERIES_COLUMNS).sort(["distribution", "norm"])
            for dataset in means["dataset"].unique(maintain_order=True).to_list()}


def write_norm_sweep_series(means: pl.DataFrame, folder: Path) -> list[Path]:
    """Write ``folder/<dataset>.csv`` per dataset and remove this function's CSVs of datasets no longer swept
    (files with its header only: DVC clears the folder before the stage runs, this covers direct calls)."""
    series = norm_sweep_series(means)
    written = [write_csv(folder / f"{stem}.csv", table) for stem, table in series.items()]
    header = ",".join(SERIES_COLUMNS)
    for stale in folder.glob("*.csv"):
        if stale.stem not in series:
            with stale.open(encoding="utf-8") as fh:
                ours = fh.readline().rstrip("\r\n") == header
            if ours:
                stale.unlink()
    return written


def run_aggregate(params: Params) -> dict:
    """Write reports/results.csv, metrics.json, norm_sweep.csv, norm_sweep/<dataset>.csv and plots/norm_sweep.png."""
    out = layout.reports(params)
    table = results_table(params)
    write_csv(out / "results.csv", table)
    # The sweep: the trained projector's Protocol A and B rows (Protocol C and the peers have no sweep).
    means = sweep_means(table.filter((pl.col("protocol") != "C") & (pl.col("method") == OURS)))
    write_csv(out / "norm_sweep.csv", means)
    write_norm_sweep_series(means, out / NORM_SWEEP_DIR)
    metrics = headline_metrics(table, params)
    write_json(out / "metrics.json", metrics, indent=2, sort_keys=True, newline=True)
    norm_sweep_plot(means, out / "plots" / "norm_sweep.png", float(params.center.norm))
    return metrics
