"""Stage ``online``: Protocol C, one cold-start pass over the normal stream, with a learning curve.

Batch size 1, one epoch, the training images in a seeded order, the center random from the start. The
test set is scored at 1, 2, 4, ... and all images seen (before the last checkpoint, a seeded sample of
``protocol_c.curve_test_images`` test images); scoring works on a copy of the projector, so the checkpoints leave
the training trajectory untouched.
"""

from __future__ import annotations

import os
from dataclasses import replace

import polars as pl
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.atomic import write_csv, write_json
from polarocc.config import Params, TrainConfig
from polarocc.detector.artefact import save_artefact
from polarocc.detector.curves import LearningCurve, checkpoints
from polarocc.detector.model_files import build_artefact
from polarocc.detector.stores import category_metrics, fit_store
from polarocc.device import pick_device
from polarocc.errors import ConfigError
from polarocc.features.store import FeatureStore
from polarocc.reports.plots import learning_curve_plot
from polarocc.training.progress import ImagesSeen, both


def online_config(params: Params) -> TrainConfig:
    """Protocol C's training settings: ``train`` with batch size 1, one epoch and the stream's order seed."""
    return replace(params.train, epochs=1, batch_size=1, seed=params.protocol_c.seed)


def run_category(store: FeatureStore, params: Params, device: str = "cpu", progress: bool = False,
                 ) -> tuple[dict, tuple]:
    """Protocol C on one category: (metrics with the learning curve, (projector, center, history))."""
    n_train = store.features("train").shape[0]
    distribution = params.center.distribution
    # The same center fit_store draws (cold start: no data involved).
    center = store.centers((distribution,), params.center.norm, params.center.seed)[distribution]
    c = params.protocol_c
    curve = LearningCurve(store, center, params.score, checkpoints(n_train), device, c.curve_test_images, c.seed)
    with tqdm(total=n_train, desc=f"  {store.path.stem} stream", unit="image", leave=False,
              disable=not progress) as bar:
        [(projector, center, history)] = fit_store(store, params, params.center.norm, (distribution,),
                                                   online_config(params),
                                                   both(curve, ImagesSeen(bar, [distribution]))).values()
    scores, pixel = curve.final
    metrics = {
        **category_metrics(store, scores, pixel.result()), "protocol": "C", "n_train": n_train,
        "curve": [{"seen": seen, **curve.points[seen]} for seen in sorted(curve.points)],
        "trainer": history.trainer, "steps": history.steps,
    }
    return metrics, (projector, center, history)


def curve_table(results: dict[str, dict], dataset: str) -> pl.DataFrame:
    """Long learning-curve table: a row per category and checkpoint, plus the category mean."""
    rows = [{"dataset": dataset, "category": category, **point}
            for category, m in results.items() for point in m["curve"]]
    table = pl.DataFrame(rows, schema_overrides={"category": pl.String})
    # Categories of different sizes end at different counts; the mean covers the checkpoints all share.
    shared = (table.group_by("seen").agg(pl.len().alias("n")).filter(pl.col("n") == len(results))["seen"])
    mean = (table.filter(pl.col("seen").is_in(shared.implode())).group_by(["dataset", "seen"])
            .agg(pl.col("image_auroc").mean(), pl.col("pixel_auroc").mean(), pl.col("test_images").sum())
            .with_columns(pl.lit("mean").alias("category")).select(table.columns))
    return pl.concat([table, mean]).sort(["category", "seen"])


def run_online(params: Params, dataset: str, progress: bool = True) -> dict[str, dict]:
    """Protocol C on every category of ``dataset``; writes models, the JSON report, the curve CSV and plot."""
    if dataset not in params.protocol_c.datasets:
        raise ConfigError(f"dataset {dataset!r} is not listed under params key 'protocol_c.datasets'")
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(params.score.device, "score.device")
    results: dict[str, dict] = {}
    for category in tqdm(params.datasets[dataset].categories, desc=f"online {dataset}", unit="category",
                         disable=not progress):
        store = FeatureStore(layout.feature_store(params, dataset, category))
        metrics, (projector, center, history) = run_category(store, params, device, progress)
        results[category] = metrics
        provenance = {"protocol": "C", "dataset": dataset, "category": category,
                      "distribution": params.center.distribution, "norm": float(params.center.norm)}
        train = {**vars(online_config(params)), "history": history.to_dict()}
        save_artefact(layout.online_model(params, dataset, category),
                      build_artefact(projector, center, store, params, train, provenance, device))
    write_json(layout.online_report(params, dataset), {"dataset": dataset, "device": device, "results": results})
    table = curve_table(results, dataset)
    write_csv(layout.learning_curve_csv(params, dataset), table)
    write_csv(layout.mean_learning_curve_csv(params, dataset),
              table.filter(pl.col("category") == "mean").select(["seen", "image_auroc", "pixel_auroc"]))
    learning_curve_plot(table, layout.learning_curve_plot(params, dataset))
    return results
