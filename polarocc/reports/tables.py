"""Results tables (polars) built from the sweep declared in params, never by globbing files."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from polarocc import layout
from polarocc.config import Params

KEYS = ["method", "protocol", "dataset", "category", "distribution", "norm"]
METRICS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]
OURS = "projector"


def _training(params: Params, protocol: str) -> dict:
    # Each protocol trains with its own budget; the table records the one that produced the row.
    t = params.train
    epochs, batch_size, trainer = {
        "A": (params.protocol_a.epochs, params.protocol_a.batch_size, "direct"),
        "C": (1, 1, t.trainer),
    }.get(protocol, (t.epochs, t.batch_size, t.trainer))
    return {"trainer": trainer, "epochs": epochs, "batch_size": batch_size}


def _row(params: Params, protocol: str, dataset: str, category: str, distribution: str | None, norm: float | None,
         m: dict, method: str = OURS) -> dict:
    return {
        "method": method, "protocol": protocol, "dataset": dataset, "category": category,
        "distribution": distribution, "norm": None if norm is None else float(norm),
        **{k: m.get(k) for k in METRICS}, "pixel_metrics": m.get("pixel_metrics"), "n_test": m["n_test"],
        "n_anomalous": m["n_anomalous"], "backbone": params.backbone.name,
        "layers": "-".join(map(str, params.backbone.layers)),
        "projector": params.projector.kind, "bias": params.projector.bias,
        **_training(params, protocol), "lr": params.train.lr,
        "weight_decay": params.train.weight_decay, "sigma": float(params.score.sigma),
        "reduction": params.score.reduction, "center_seed": params.center.seed,
    }


def results_table(params: Params) -> pl.DataFrame:
    """One row per protocol x dataset x category x distribution x norm of the current params."""
    rows = []
    payloads: dict[float, dict] = {}
    for distribution, norm in params.variants():
        if norm not in payloads:
            path = layout.norm_scores(params, norm)
            if not path.is_file():
                raise FileNotFoundError(f"missing scores of norm {norm:g} at {path}; run the score stage "
                                        "(dvc repro score)")
            payloads[norm] = json.loads(path.read_text())["results"]
        if distribution not in payloads[norm]:
            raise KeyError(f"scores of norm {norm:g} hold no distribution {distribution!r}; rerun dvc repro score")
        for dataset, categories in payloads[norm][distribution].items():
            if dataset not in params.datasets and dataset not in params.protocol_a.datasets:
                continue
            for category, m in categories.items():
                if dataset in params.datasets and category not in params.datasets[dataset].categories:
                    continue
                rows.append(_row(params, m.get("protocol", "B"), dataset, category, distribution, norm, m))
    for dataset in params.protocol_c.datasets:
        path = layout.online_report(params, dataset)
        if not path.is_file():
            raise FileNotFoundError(f"missing Protocol C results at {path}; run the online stage "
                                    f"(dvc repro online@{dataset})")
        for category, m in json.loads(path.read_text())["results"].items():
            rows.append(_row(params, "C", dataset, category, params.center.distribution, params.center.norm, m))
    if params.peers.methods:
        path = layout.peers_report(params)
        if not path.is_file():
            raise FileNotFoundError(f"missing peer results at {path}; run the peers stage (dvc repro peers)")
        peers = json.loads(path.read_text())["results"]
        for method in params.peers.methods:
            # The untrained control uses the default center; PatchCore and PaDiM have none.
            center = (params.center.distribution, params.center.norm) if method == "untrained" else (None, None)
            for dataset, categories in peers[method].items():
                for category, m in categories.items():
                    rows.append(_row(params, m["protocol"], dataset, category, *center, m, method))
    schema = {k: pl.Float64 for k in METRICS} | {"distribution": pl.String, "norm": pl.Float64,
                                                  "pixel_metrics": pl.String}
    return pl.DataFrame(rows, schema_overrides=schema).sort(KEYS, nulls_last=True)


def read_results(path: Path) -> pl.DataFrame:
    """Read reports/results.csv back (category names such as digit classes stay strings)."""
    return pl.read_csv(path, schema_overrides={"category": pl.String, "pixel_metrics": pl.String,
                                               **{k: pl.Float64 for k in METRICS}})


def sweep_means(table: pl.DataFrame) -> pl.DataFrame:
    """Mean metrics over categories per method, protocol, dataset, distribution and norm. A metric some
    categories lack (pixel metrics of image-level categories) has no mean: a mean over the others alone would be
    reported as the dataset's."""
    keys = ["method", "protocol", "dataset", "distribution", "norm"]
    means = [pl.when(pl.col(k).null_count() == 0).then(pl.col(k).mean()).otherwise(None).alias(k) for k in METRICS]
    return (table.group_by(keys).agg(*means, pl.len().alias("categories")).sort(keys, nulls_last=True))


def headline_metrics(table: pl.DataFrame, params: Params) -> dict:
    """The few numbers ``dvc exp show`` displays: the default variant per dataset plus sweep summaries."""
    means = sweep_means(table)
    metrics: dict[str, dict] = {}
    for dataset in [*params.datasets, *params.protocol_a.datasets]:
        ds = means.filter((pl.col("dataset") == dataset) & (pl.col("protocol") != "C") & (pl.col("method") == OURS))
        default = ds.filter((pl.col("distribution") == params.center.distribution)
                            & (pl.col("norm") == float(params.center.norm)))
        at_default_norm = ds.filter(pl.col("norm") == float(params.center.norm))["image_auroc"]
        largest = ds.filter(pl.col("norm") == ds["norm"].max())
        by_norm = ds.group_by("norm").agg(pl.col("image_auroc").mean()).sort("norm")
        entry = {
            "image_auroc": round(default["image_auroc"].item(), 4),

            "distribution_spread": round(at_default_norm.max() - at_default_norm.min(), 4),
            "largest_norm_image_auroc": round(largest["image_auroc"].mean(), 4),
            # Analysis of the sweep on test labels: never used to choose the reported model.
            "sweep_peak_norm": float(by_norm.sort(["image_auroc", "norm"], descending=[True, False])["norm"][0]),
        }
        for key in ("pixel_auroc", "aupro"):
            if default[key].item() is not None:  # Protocol A is image-level only
                entry[key] = round(default[key].item(), 4)
        for method in params.peers.methods:
            peer = means.filter((pl.col("dataset") == dataset) & (pl.col("method") == method))
            if peer.height:
                entry[f"{method}_image_auroc"] = round(peer["image_auroc"].item(), 4)
        online = means.filter((pl.col("dataset") == dataset) & (pl.col("protocol") == "C"))
        if online.height:
            entry["online_image_auroc"] = round(online["image_auroc"].item(), 4)
            entry["online_pixel_auroc"] = round(online["pixel_auroc"].item(), 4)
        metrics[dataset] = entry
    return metrics
