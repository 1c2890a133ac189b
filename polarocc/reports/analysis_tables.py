"""Analysis tables (polars) from the pipeline's JSON outputs: feasibility, polar diagnostics, training
history and budget curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import polars as pl

from polarocc import layout
from polarocc.config import Params
from polarocc.reports.tables import OURS


def feasibility_table(results: pl.DataFrame, cosines: dict, params: Params) -> pl.DataFrame:
    """Per category: pre-trained cosines, AUROC per swept norm (default distribution), the feasible norms
    (AUROC within ``analysis.tolerance`` of the best), the largest of them (the tolerated norm: the labelled
    recommendation of how large a norm the category allows) and the label-free recommendation.

    The label-free estimate uses the category's normal training images only: the cosine between two halves
    of them, mapped to a norm by a line fitted on the *other* categories (leave-one-out) between that
    cosine and log2 of their tolerated norm.
    """
    ours = results.filter((pl.col("method") == OURS) & (pl.col("protocol") != "C")
                          & (pl.col("distribution") == params.center.distribution))
    norms = sorted(float(n) for n in params.sweep.norms)
    rows = []
    for (dataset, category), part in ours.group_by(["dataset", "category"], maintain_order=True):
        auroc = {float(n): a for n, a in part.select(["norm", "image_auroc"]).iter_rows()}
        best = max(auroc.values())
        feasible = [n for n in norms if auroc[n] >= best - params.analysis.tolerance]
        tolerated = max(feasible)
        rows.append({"dataset": dataset, "category": category, **cosines[dataset][category],
                     **{f"auroc_norm_{n:g}": auroc[n] for n in norms},
                     "feasible_norms": ", ".join(f"{n:g}" for n in feasible), "tolerated_norm": tolerated})
    table = pl.DataFrame(rows)
    x = table["cosine_normal_normal"].to_numpy()
    y = np.log2(table["tolerated_norm"].to_numpy())
    predicted = []
    for i in range(len(table)):
        others = np.arange(len(table)) != i
        if others.sum() >= 3 and np.ptp(x[others]) > 0:
            slope, intercept = np.polyfit(x[others], y[others], 1)
            predicted.append(intercept + slope * x[i])
        else:
            # Too few other categories for a line: their mean, or (alone) the default norm.
            predicted.append(float(np.mean(y[others])) if others.any() else math.log2(params.center.norm))
    label_free = [max([n for n in norms if math.log2(n) <= p + 1e-9] or [norms[0]]) for p in predicted]
    feasible_sets = [set(map(float, f.split(", "))) for f in table["feasible_norms"]]
    return table.with_columns(
        pl.Series("label_free_norm", label_free),
        pl.Series("label_free_in_feasible", [n in f for n, f in zip(label_free, feasible_sets, strict=True)]),
        pl.Series("log2_error", [math.log2(n / t) for n, t in zip(label_free, table["tolerated_norm"], strict=True)]),
    )


def feasibility_agreement(feasibility: pl.DataFrame) -> pl.DataFrame:
    """Per dataset and overall: how well the label-free estimate tracks the labelled one."""
    from scipy.stats import spearmanr

    def summary(part: pl.DataFrame, name: str) -> dict:
        rho = spearmanr(part["cosine_normal_normal"], part["cosine_normal_anomalous"]).statistic \
            if part.height >= 3 else float("nan")
        return {"dataset": name, "categories": part.height, "spearman_cosines": float(rho),
                "label_free_in_feasible": float(part["label_free_in_feasible"].mean()),
                "mean_abs_log2_error": float(part["log2_error"].abs().mean())}

    rows = [summary(part, dataset) for (dataset,), part in feasibility.group_by(["dataset"], maintain_order=True)]
    return pl.DataFrame([*rows, summary(feasibility, "all")])


def polar_table(params: Params) -> pl.DataFrame:
    """Polar diagnostics per dataset, distribution and norm (mean over categories)."""
    rows = []
    for norm in params.sweep.norms:
        payload = json.loads(layout.norm_scores(params, norm).read_text())["results"]
        for distribution in params.sweep.distributions:
            for dataset, categories in payload[distribution].items():
                for category, m in categories.items():
                    polar = m["polar"]
                    row = {"dataset": dataset, "category": category, "distribution": distribution,
                           "norm": float(norm), "cosine_normal_anomalous": polar["cosine_normal_anomalous"]}
                    for kind in ("normal", "anomalous"):
                        for quantity in ("radius", "angle_deg"):
                            for q in ("q25", "q50", "q75"):
                                row[f"{kind}_{quantity}_{q}"] = polar[kind][quantity][q]
                    rows.append(row)
    table = pl.DataFrame(rows)
    values = [c for c in table.columns if c not in ("dataset", "category", "distribution", "norm")]
    return (table.group_by(["dataset", "distribution", "norm"], maintain_order=True)
            .agg(*[pl.col(c).mean() for c in values]).sort(["dataset", "distribution", "norm"]))


def history_table(params: Params) -> pl.DataFrame:
    """Loss, ||W|| and ||b - c|| per epoch of every trained variant (mean over categories)."""
    rows = []
    for norm in params.sweep.norms:
        histories = json.loads((layout.model_dir(params, norm) / "history.json").read_text())
        for distribution, per_dataset in histories.items():
            for dataset, per_category in per_dataset.items():
                for category, h in per_category.items():
                    rows += [{"dataset": dataset, "category": category, "distribution": distribution,
                              "norm": float(norm), "epoch": e + 1, "loss": loss, "weight_norm": w, "bias_gap": g}
                             for e, (loss, w, g) in enumerate(zip(h["loss"], h["weight_norm"], h["bias_gap"],
                                                                  strict=True))]
    return (pl.DataFrame(rows).group_by(["dataset", "distribution", "norm", "epoch"], maintain_order=True)
            .agg(pl.col("loss").mean(), pl.col("weight_norm").mean(), pl.col("bias_gap").mean())
            .sort(["dataset", "distribution", "norm", "epoch"]))


def budget_table(budget_json: Path) -> pl.DataFrame:
    """Test AUROC per epoch of the default variant with and without bias, per category."""
    rows = []
    for dataset, per_category in json.loads(budget_json.read_text()).items():
        for category, curves in per_category.items():
            for key, bias in (("bias", True), ("no_bias", False)):
                # test_images: how many test images the point scored (Protocol B; a sample before the last epoch)
                rows += [{"dataset": dataset, "category": category, "bias": bias, **point,
                          "test_images": point.get("test_images")}
                         for point in curves[key]]
    return pl.DataFrame(rows, schema_overrides={"pixel_auroc": pl.Float64, "category": pl.String,
                                                "test_images": pl.Int64})


def budget_means(budget: pl.DataFrame) -> pl.DataFrame:
    """Mean over categories per dataset, bias and epoch."""
    return (budget.group_by(["dataset", "bias", "epoch"], maintain_order=True)
            .agg(pl.col("image_auroc").mean(), pl.col("pixel_auroc").mean()).sort(["dataset", "bias", "epoch"]))
