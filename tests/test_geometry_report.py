"""The geometry report: image AUROC per defect type, and the table that compares geometries."""

from __future__ import annotations

import pytest

from bench.geometry import GEOMETRIES, command, summary, to_markdown
from polarocc.reports.geometry import defect_type_aurocs, geometry_table


def test_defect_type_aurocs_compare_each_type_with_the_good_images() -> None:
    scores = [1, 2, 3, 10, 11, 2.5, 0.5]
    labels = [0, 0, 0, 1, 1, 1, 1]
    kinds = ["good", "good", "good", "border", "border", "tiny", "tiny"]
    aurocs = defect_type_aurocs(scores, labels, kinds)
    assert aurocs == {"border": 1.0, "tiny": pytest.approx(1 / 3, abs=1e-4)}


def _metrics(auroc: float) -> dict:
    return {"textures": {"brick": {"input_height": 307, "input_width": 768, "crop": False, "tiles_per_image": 10,
                                   "image_auroc": auroc, "pixel_auroc": 0.9, "aupro": 0.8,
                                   "image_auroc_by_defect": {"border": auroc, "tiny": 0.6},
                                   "seconds_per_image": 0.5, "feature_bytes_per_image": 2 ** 20,
                                   "store_bytes_per_image": 2 ** 21}}}


def test_comparison_table_and_markdown() -> None:
    import polars as pl

    table = pl.concat([geometry_table(_metrics(0.7), "paper"), geometry_table(_metrics(0.9), "tiled")],
                      how="diagonal_relaxed")
    means = summary(table)
    assert means["geometry"].to_list() == ["paper", "tiled"] and means["auroc_border"].to_list() == [0.7, 0.9]
    assert table["feature_MiB_per_image"].to_list() == [1.0, 1.0] and table["input"][0] == "307x768"
    text = to_markdown({"found": ["paper", "tiled"], "rows": table.to_dicts(), "means": means.to_dicts()})
    assert "| tiled" in text and "auroc_border" in text


def test_the_experiments_differ_only_in_geometry() -> None:
    runs = {name: command(name) for name in GEOMETRIES}
    for name, args in runs.items():
        changed = [a for a in args if a.startswith("backbone.")]
        assert sorted(a.split("=")[0] for a in changed) == ["backbone.crop", "backbone.resize", "backbone.tiles"]
        assert args[:6] == ["dvc", "exp", "run", "--temp", "-n", f"geometry-{name.replace('_', '-')}"]
        common = [a for a in args[6:] if a != "-S" and not a.startswith("backbone.")]
        assert common == [a for a in runs["paper"][6:] if a != "-S" and not a.startswith("backbone.")]


def test_pixel_metrics_per_defect_type_use_that_type_and_the_good_images(extracted_project) -> None:
    import numpy as np
    import torch

    from polarocc import layout
    from polarocc.config import load_params
    from polarocc.detector.stores import defect_type_pixel_metrics
    from polarocc.features.store import FeatureStore
    from polarocc.models.projector import Projector
    from polarocc.scoring.maps import score_batch
    from polarocc.scoring.metrics import aupro, pixel_auroc

    params = load_params(extracted_project / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    projector, center = Projector(store.channels, seed=2), torch.randn(store.channels)
    per_type = defect_type_pixel_metrics(store, projector, center, params.score)
    s = params.score
    maps = score_batch(projector, center, torch.from_numpy(store.features("test")[:]).float(), store.geometry.size,
                       s.sigma, s.reduction, s.topk, s.squared)[0].numpy()
    masks = store.masks(slice(None))
    kinds = np.array([x.defect_type for x in store.samples("test")])
    assert set(per_type) == set(kinds) - {"good"}
    for kind, metrics in per_type.items():
        rows = (kinds == "good") | (kinds == kind)
        assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(masks[rows], maps[rows]), abs=1e-6)
        assert metrics["aupro"] == pytest.approx(aupro(masks[rows], maps[rows]), abs=1e-6)
