"""Stage ``report``: the analysis tables and plots, and ``reports/report.md`` that gathers them."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from polarocc import layout
from polarocc.atomic import write_csv, write_json, write_text
from polarocc.config import Params
from polarocc.reports.analysis_tables import (
    budget_means,
    budget_table,
    feasibility_agreement,
    feasibility_table,
    history_table,
    polar_table,
)
from polarocc.reports.figures import budget_plot, category_sweep_plot, feasibility_plot, polar_plot
from polarocc.reports.geometry import geometry_metrics, geometry_table
from polarocc.reports.markdown import category_table, distribution_table, headline_table, md_table
from polarocc.reports.tables import OURS, read_results

SECTIONS = ("Headline", "Center distributions (Table 4)", "Per category (Table S4)", "Norm sweep",
            "Feasibility (Fig. 4)", "Polar diagnostics (Fig. 2)", "Training budget", "Protocol C learning curve",
            "Input geometry", "Figures")


def _link(report: Path, target: Path, text: str) -> str:
    return f"![{text}]({target.relative_to(report.parent).as_posix()})"


def write_curves(table: pl.DataFrame, folder: Path, x: str, columns: list[str]) -> None:
    """One CSV per dataset with ``x`` and ``columns`` (the sources of the ``dvc plots`` definitions)."""
    for (dataset,), part in table.group_by(["dataset"], maintain_order=True):
        write_csv(folder / f"{dataset}.csv", part.select([x, *columns]).sort(x))


def _sample(images: int) -> str:
    """How a curve's sample size reads in the report."""
    return ("every test image" if images == 0 else
            f"about {images} test images, at least one per defect type, or the whole split when it is smaller")


def run_report(params: Params) -> Path:
    """Write the analysis tables and plots and reports/report.md; returns the report's path."""
    reports = layout.reports(params)
    plots = reports / "plots"
    analysis = layout.analysis_dir(params)
    results = read_results(reports / "results.csv")
    cosines = json.loads((analysis / "cosines.json").read_text())

    feasibility = feasibility_table(results, cosines, params)
    write_csv(reports / "feasibility.csv", feasibility)
    agreement = feasibility_agreement(feasibility)
    feasibility_plot(feasibility, plots / "feasibility.png")

    polar = polar_table(params)
    write_csv(analysis / "polar.csv", polar)
    default_polar = polar.filter(pl.col("distribution") == params.center.distribution)
    polar_plot(default_polar, plots / "polar.png")
    write_curves(default_polar, reports / "polar_curves", "norm",
                 ["normal_radius_q50", "anomalous_radius_q50", "normal_angle_deg_q50", "anomalous_angle_deg_q50",
                  "cosine_normal_anomalous"])

    history = history_table(params)
    write_csv(analysis / "training_history.csv", history)
    budget = budget_table(analysis / "budget.json")
    write_csv(analysis / "budget.csv", budget)
    means = budget_means(budget)
    budget_plot(history.filter(pl.col("distribution") == params.center.distribution), means, plots / "budget.png")
    wide = means.pivot(on="bias", index=["dataset", "epoch"], values="image_auroc").rename(
        {"true": "image_auroc_bias", "false": "image_auroc_no_bias"})
    write_curves(wide, reports / "budget_curves", "epoch", ["image_auroc_bias", "image_auroc_no_bias"])
    last = means.group_by(["dataset", "bias"]).agg(pl.all().sort_by("epoch").last()).sort(["dataset", "bias"])
    ablation = last.pivot(on="bias", index="dataset", values="image_auroc").rename(
        {"true": "image AUROC with bias", "false": "image AUROC without bias"}).sort("dataset")

    sweep = results.filter((pl.col("method") == OURS) & (pl.col("protocol") != "C"))
    category_sweep_plot(sweep.filter(pl.col("protocol") == "B"), plots / "category_sweep_pixel.png", "pixel_auroc")
    category_sweep_plot(sweep, plots / "category_sweep.png")

    geometry = geometry_metrics(params)
    write_json(reports / "geometry.json", geometry)

    report = reports / "report.md"
    c = params.center
    online = results.filter(pl.col("protocol") == "C").select(
        "dataset", "category", "image_auroc", "pixel_auroc", "aupro", "image_f1_max")
    feasibility_shown = feasibility.select(
        "dataset", "category", "cosine_normal_anomalous", "cosine_normal_normal", "feasible_norms",
        "tolerated_norm", "label_free_norm", "label_free_in_feasible")
    overlays = [layout.overlay_plot(params, d, c) for d, ds in params.datasets.items() for c in ds.categories]
    sections = {
        SECTIONS[0]: ("Mean metrics per dataset at the default center "
                      f"({c.distribution}, norm {c.norm:g}), the online Protocol C, and the peers on the same "
                      "cached features (final epoch; AUPRO integrated to FPR 0.3).",
                      md_table(headline_table(results, params))),
        SECTIONS[1]: (f"Mean image AUROC per center distribution at norm {c.norm:g}: the data-free centers "
                      "against the mean pre-trained feature.", md_table(distribution_table(results, params))),
        SECTIONS[2]: ("Every category at the default center: the trained projector against PatchCore-style, "
                      "PaDiM-style and untrained-projector peers.", md_table(category_table(results, params))),
        SECTIONS[3]: ("Image AUROC (and pixel AUROC for Protocol B) against the center norm, per dataset and "
                      "per category.",
                      "\n\n".join(_link(report, plots / p, p) for p in
                                  ("norm_sweep.png", "category_sweep.png", "category_sweep_pixel.png"))),
        SECTIONS[4]: (f"Cosine similarity of pre-trained features between normal and anomalous test samples, "
                      f"the norms whose AUROC stays within {params.analysis.tolerance:g} of the best (feasible), the "
                      "largest of them (tolerated norm: the labelled recommendation), and the label-free "
                      "recommendation: the cosine between two halves of the normal training images, mapped to a "
                      "norm by a line fitted on the other categories (leave-one-out).",
                      md_table(feasibility_shown) + "\n\nAgreement of the label-free estimate:\n\n"
                      + md_table(agreement) + "\n\n" + _link(report, plots / "feasibility.png", "feasibility")),
        SECTIONS[5]: (f"Radius ||z|| and angle between z and c of projected normal and anomalous test features, "
                      f"and their cosine similarity, against the norm ({c.distribution} center; medians, the "
                      "plot shows the interquartile range).",
                      md_table(default_polar.select(
                          "dataset", "norm", "normal_radius_q50", "anomalous_radius_q50", "normal_angle_deg_q50",
                          "anomalous_angle_deg_q50", "cosine_normal_anomalous"))
                      + "\n\n" + _link(report, plots / "polar.png", "polar diagnostics")),
        SECTIONS[6]: ("Loss, ||W|| and ||b - c|| per epoch for every norm (distance from the collapse W = 0, "
                      "b = c), and test AUROC per epoch with and without bias: an analysis, never used to pick "
                      "the reported (final-epoch) model; every epoch scores the same seeded sample of "
                      f"{_sample(params.analysis.budget_test_images)}. Bias ablation at the final epoch, on that "
                      "sample:",
                      md_table(ablation) + "\n\n" + _link(report, plots / "budget.png", "training budget")),
        SECTIONS[7]: ("Protocol C (batch 1, one pass, cold start): final metrics per category and the test AUROC "
                      "after 1, 2, 4, ... images (every checkpoint on the same seeded sample of "
                      f"{_sample(params.protocol_c.curve_test_images)}; the final metrics on the whole split).",
                      md_table(online) + "\n\n" + "\n\n".join(
                          _link(report, layout.learning_curve_plot(params, d), f"learning curve {d}")
                          for d in params.protocol_c.datasets)),
        SECTIONS[8]: ("Per category at the default center: the model input (height x width, tiles per image), "
                      "the metrics, the image AUROC and AUPRO of each defect type against the good images, and what "
                      "extraction stores per image (feature MiB; its wall seconds per image, which vary from run "
                      "to run, are in reports/geometry.json, so this report stays byte-reproducible). "
                      "bench/geometry.py compares these rows across geometries (README, Input geometry).",
                      md_table(geometry_table(geometry).drop("s_per_image")) if geometry
                      else "No Protocol B dataset."),
        SECTIONS[9]: ("Anomaly-map overlays of a fixed selection of test images per category (default model, "
                      "its saved threshold), and t-SNE of projected features for each center distribution.",
                      "\n\n".join([_link(report, p, p.stem) for p in overlays]
                                  + [_link(report, layout.tsne_plot(params, d), f"t-SNE {d}")
                                     for d in [*params.datasets, *params.protocol_a.datasets]])),
    }
    text = ["# polarocc report", "",
            f"Backbone {params.backbone.name} (layers {list(params.backbone.layers)}), projector "
            f"{params.projector.kind} (bias {params.projector.bias}), {params.train.epochs} epochs. Generated by "
            "`dvc repro`; the numbers come from `reports/results.csv`.", ""]
    for title, (summary, body) in sections.items():
        text += [f"## {title}", "", summary, "", body, ""]
    write_text(report, "\n".join(text))
    return report
