"""Stage ``aggregate``: results table, ``dvc exp show`` metrics and the norm-sweep plot."""

from __future__ import annotations

import json

import polars as pl

from polarocc.config import Params
from polarocc.pipeline import paths
from polarocc.reports.plots import norm_sweep_plot
from polarocc.reports.tables import OURS, headline_metrics, results_table, sweep_means


def run_aggregate(params: Params) -> dict:
    """Write reports/results.csv, reports/metrics.json, reports/norm_sweep.csv and its plot."""
    out = paths.reports(params)
    out.mkdir(parents=True, exist_ok=True)
    table = results_table(params)
    table.write_csv(out / "results.csv")
    # The sweep: the trained projector's Protocol A and B rows (Protocol C and the peers have no sweep).
    means = sweep_means(table.filter((pl.col("protocol") != "C") & (pl.col("method") == OURS)))
    means.write_csv(out / "norm_sweep.csv")
    metrics = headline_metrics(table, params)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    norm_sweep_plot(means, out / "plots" / "norm_sweep.png", float(params.center.norm))
    return metrics
