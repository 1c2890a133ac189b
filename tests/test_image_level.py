"""Datasets without masks run Protocol B with image-level metrics only; `polarocc validate` says which they are."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polarocc.cli import app
from polarocc.config import load_params
from polarocc.pipeline.extract import run_extract
from polarocc.pipeline.online import run_online
from polarocc.pipeline.score import run_score
from polarocc.pipeline.train import run_train
from tests.conftest import tiny_params, write_params

pytestmark = pytest.mark.integration


@pytest.fixture
def unmasked(mvtec_tree: Path, tmp_path: Path, default_params: dict) -> Path:
    """A project whose dataset has brick without ground_truth/ and gravel with one defect type unmasked."""
    data = tmp_path / "data"
    for category in ("brick", "gravel"):
        shutil.copytree(mvtec_tree / category, data / category)
    shutil.rmtree(data / "brick" / "ground_truth")
    shutil.rmtree(data / "gravel" / "ground_truth" / "stain")
    raw = tiny_params(default_params)
    raw["datasets"] = {"plain": {"format": "mvtec", "path": str(data), "categories": ["brick", "gravel"]}}
    raw["protocol_a"]["datasets"] = {}
    raw["protocol_c"] = {"datasets": ["plain"], "seed": 5}
    return write_params(raw, tmp_path)


def test_validate_names_the_image_level_categories(unmasked: Path) -> None:
    result = CliRunner().invoke(app, ["validate", "-p", str(unmasked)])
    assert result.exit_code == 0, result.output
    assert "plain/brick: image-level only (no masks for 1 hole, 1 patch, 1 scratch, 1 stain image(s))" in result.output
    assert "plain/gravel: image-level only (no masks for 1 stain image(s))" in result.output


def test_protocol_b_without_masks_reports_image_metrics_and_empty_pixel_columns(unmasked: Path) -> None:
    params = load_params(unmasked)
    run_extract(params, "plain", progress=False)
    run_train(params, 1.0, progress=False)
    results = run_score(params, 1.0, progress=False)
    for category in ("brick", "gravel"):
        metrics = results["normal"]["plain"][category]
        assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["n_anomalous"] == 4
        assert metrics["pixel_auroc"] is None and metrics["aupro"] is None and metrics["pixel_f1_max"] is None
        assert metrics["pixel_metrics"] == "none (no masks)"
    online = run_online(params, "plain", progress=False)
    assert online["brick"]["pixel_auroc"] is None and online["brick"]["curve"][-1]["pixel_auroc"] is None


def test_a_dataset_mean_leaves_out_a_metric_some_categories_lack() -> None:
    import polars as pl

    from polarocc.reports.tables import METRICS, sweep_means

    rows = [{"method": "ours", "protocol": "B", "dataset": "mixed", "distribution": "normal", "norm": 1.0,
             **dict.fromkeys(METRICS)} for _ in range(2)]
    rows[0].update(image_auroc=0.8, pixel_auroc=0.95)  # masked category
    rows[1].update(image_auroc=0.9)  # image-level category
    means = sweep_means(pl.DataFrame(rows, schema_overrides=dict.fromkeys(METRICS, pl.Float64)))
    assert means["image_auroc"].item() == pytest.approx(0.85) and means["categories"].item() == 2
    assert means["pixel_auroc"].item() is None  # not 0.95, the masked category's alone
