"""What the input geometry bought and cost: per category the default model's metrics, the image AUROC and the
pixel metrics per defect type (border defects, the smallest defects), and extraction seconds and stored bytes
per image.

The rows of one run form ``reports/geometry.json`` (a DVC metrics file); ``bench/geometry.py`` puts the rows of
several experiments (paper crop, full frame, tiled) side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from polarocc import layout
from polarocc.config import Params
from polarocc.scoring.metrics import image_auroc

MIB = 2 ** 20


def defect_type_aurocs(scores: list[float], labels: list[int], defect_types: list[str]) -> dict[str, float]:
    """Image ROC AUC of each defect type against the good images alone (which defects the model separates)."""
    s, y, kinds = np.asarray(scores, dtype=np.float64), np.asarray(labels), np.asarray(defect_types)
    good = y == 0
    return {kind: round(image_auroc(np.r_[np.zeros(good.sum()), np.ones((kinds == kind).sum())],
                                    np.r_[s[good], s[kinds == kind]]), 4)
            for kind in sorted(set(defect_types) - {"good"}) if good.any()}


def geometry_metrics(params: Params) -> dict[str, dict[str, dict[str, Any]]]:
    """Per Protocol B dataset and category: the geometry, the default model's metrics, image AUROC per defect type
    (from its scores), pixel ROC AUC and AUPRO per defect type (reports/analysis/defect_types.json), and the
    extraction's seconds and bytes per image (reports/extract/<dataset>.json)."""
    c = params.center
    results = json.loads(layout.norm_scores(params, c.norm).read_text())["results"][c.distribution]
    pixel_by_defect = json.loads((layout.analysis_dir(params) / "defect_types.json").read_text())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for dataset, ds in params.datasets.items():
        record = json.loads(layout.extraction_record(params, dataset).read_text())["categories"]
        for category in ds.categories:
            r, e = results[dataset][category], record[category]
            out.setdefault(dataset, {})[category] = {
                "input_height": e["input_height"], "input_width": e["input_width"],
                "crop": e["geometry"]["crop"] is not None, "tiles_per_image": e["tiles_per_image"],
                "image_auroc": r["image_auroc"], "pixel_auroc": r.get("pixel_auroc"), "aupro": r.get("aupro"),
                "image_auroc_by_defect": defect_type_aurocs(r["scores"], r["labels"], r["defect_types"]),
                "pixel_by_defect": pixel_by_defect.get(dataset, {}).get(category, {}),
                "seconds_per_image": e["seconds_per_image"], "feature_bytes_per_image": e["feature_bytes_per_image"],
                "store_bytes_per_image": e["store_bytes_per_image"]}
    return out


def geometry_table(metrics: dict[str, dict[str, dict[str, Any]]], label: str | None = None) -> pl.DataFrame:
    """One row per dataset category (prefixed by ``label``, e.g. an experiment's name, when given), a column per
    defect type."""
    rows = []
    for dataset, categories in metrics.items():
        for category, m in categories.items():
            row: dict[str, Any] = {} if label is None else {"geometry": label}
            row |= {"dataset": dataset, "category": category, "input": f"{m['input_height']}x{m['input_width']}",
                    "tiles": m["tiles_per_image"], "image_auroc": m["image_auroc"],
                    "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"],
                    **{f"auroc_{kind}": v for kind, v in m["image_auroc_by_defect"].items()},
                    **{f"aupro_{kind}": round(v["aupro"], 4) for kind, v in m.get("pixel_by_defect", {}).items()},
                    "s_per_image": m["seconds_per_image"],
                    "feature_MiB_per_image": round(m["feature_bytes_per_image"] / MIB, 3)}
            rows.append(row)
    return pl.DataFrame(rows) if rows else pl.DataFrame()


def read_geometry_metrics(path: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """reports/geometry.json as written by the report stage."""
    return json.loads(Path(path).read_text())
