"""Protocol C: a cold-start single pass with batch 1, its learning curve and its saved models."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from polarocc import layout
from polarocc.config import load_params
from polarocc.detector.artefact import load_artefact
from polarocc.detector.curves import checkpoints
from polarocc.detector.stores import score_store
from polarocc.errors import ConfigError
from polarocc.features.store import FeatureStore
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.pipeline.online import online_config, run_category, run_online
from polarocc.scoring.maps import score_batch
from polarocc.scoring.metrics import image_auroc, pixel_auroc
from polarocc.training.direct import train_direct


def test_checkpoints_double_until_every_image() -> None:
    assert checkpoints(64) == [1, 2, 4, 8, 16, 32, 64]
    assert checkpoints(6) == [1, 2, 4, 6]
    assert checkpoints(1) == [1]


def test_online_config_is_batch_one_single_pass(project_copy: Path) -> None:
    cfg = online_config(load_params(project_copy / "params.yaml"))
    assert (cfg.batch_size, cfg.epochs, cfg.seed) == (1, 1, 5)


def test_curve_does_not_change_the_model_and_ends_at_the_final_scores(project_copy: Path) -> None:
    params = load_params(project_copy / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    metrics, (projector, center, history) = run_category(store, params)
    assert [p["seen"] for p in metrics["curve"]] == [1, 2, 4, 6] and history.steps == 6

    # Without any checkpoint evaluation, the reference batch-1 trainer lands on the same weights.
    cfg = online_config(params)
    reference = Projector(store.channels, params.projector.kind, params.projector.bias, seed=cfg.seed,
                          dtype=torch.float64)
    features = store.features("train")
    cold = make_center(params.center.distribution, params.center.norm, store.channels, params.center.seed)
    train_direct(reference, cold, lambda idx: features.oindex[np.sort(idx)], features.shape[0], cfg)
    torch.testing.assert_close(projector.weight, reference.weight, rtol=0, atol=1e-9)
    torch.testing.assert_close(center, cold)

    # The curve scores the model as it is saved and read back: in float32.
    saved = copy.deepcopy(projector).float()
    [scores] = score_store(store, [(saved, center)], params.score)
    cfg = params.score
    maps, _ = score_batch(saved, center, torch.from_numpy(store.features("test")[:]),
                          int(store.attrs["geometry"]["crop"]), cfg.sigma, cfg.reduction, cfg.topk, cfg.squared)
    labels = np.array([s.label for s in store.samples("test")])
    assert metrics["image_auroc"] == image_auroc(labels, scores) == metrics["curve"][-1]["image_auroc"]
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc(store.masks(), maps.numpy()), abs=1e-12)
    assert metrics["scores"] == pytest.approx(scores, abs=1e-5)


def test_run_online_writes_models_curve_and_plot(project_copy: Path) -> None:
    params = load_params(project_copy / "params.yaml")
    results = run_online(params, "mine", progress=False)
    assert set(results) == {"brick", "gravel"} and all(m["protocol"] == "C" for m in results.values())
    curve = pl.read_csv(layout.learning_curve_csv(params, "mine"), schema_overrides={"category": pl.String})
    assert set(curve["category"]) == {"brick", "gravel", "mean"}
    mean6 = curve.filter((pl.col("category") == "mean") & (pl.col("seen") == 6))["image_auroc"].item()
    assert mean6 == pytest.approx(np.mean([results[c]["image_auroc"] for c in ("brick", "gravel")]))
    dvc_curve = pl.read_csv(layout.mean_learning_curve_csv(params, "mine"))
    assert dvc_curve.columns == ["seen", "image_auroc", "pixel_auroc"] and dvc_curve["seen"].to_list() == [1, 2, 4, 6]
    assert layout.learning_curve_plot(params, "mine").stat().st_size > 10_000
    model = load_artefact(layout.online_model(params, "mine", "brick"))
    assert model.provenance["protocol"] == "C" and model.train["batch_size"] == 1 and model.train["epochs"] == 1
    assert len(model.normal_scores) == 6 and model.threshold.value == max(model.normal_scores)  # quantile 0.99 of 6


def test_cold_start_rejects_a_data_dependent_center(project_copy: Path) -> None:
    raw = yaml.safe_load((project_copy / "params.yaml").read_text())
    raw["center"]["distribution"] = "feature_mean"
    raw["sweep"]["distributions"] = ["feature_mean"]
    (project_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="Protocol C starts cold"):
        load_params(project_copy / "params.yaml")
    raw["protocol_c"]["datasets"] = ["other"]
    raw["center"]["distribution"] = "normal"
    raw["sweep"]["distributions"] = ["normal"]
    (project_copy / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"protocol_c\.datasets"):
        load_params(project_copy / "params.yaml")
