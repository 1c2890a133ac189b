"""Learning curves on a sample: the checkpoints before the last score a seeded, stratified sample of the test split,
the last one scores all of it; score_store on a subset of rows scores exactly those images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.config import load_params
from polarocc.detector import curves
from polarocc.detector.curves import LearningCurve
from polarocc.detector.stores import pixel_accumulators, score_store
from polarocc.features.store import CachedRows, FeatureStore
from polarocc.models.projector import Projector
from polarocc.sampling import stratified_rows
from polarocc.scoring.maps import score_batch
from polarocc.scoring.metrics import image_auroc, pixel_auroc
from polarocc.training.progress import ImagesSeen, both


def test_stratified_rows_keep_every_group_in_proportion_and_are_seeded() -> None:
    groups = ["good"] * 60 + ["hole"] * 30 + ["scratch"] * 9 + ["stain"] * 1
    rows = stratified_rows(groups, 20, seed=3)
    picked = [groups[i] for i in rows]
    assert {g: picked.count(g) for g in set(picked)} == {"good": 12, "hole": 6, "scratch": 2, "stain": 1}
    assert np.all(np.diff(rows) > 0)  # ascending, no repeats
    assert np.array_equal(rows, stratified_rows(groups, 20, seed=3))
    assert not np.array_equal(rows, stratified_rows(groups, 20, seed=4))
    assert np.array_equal(stratified_rows(groups, 0), np.arange(100))  # 0: everything
    assert np.array_equal(stratified_rows(groups, 100), np.arange(100))


def _store_and_model(project_copy: Path):
    params = load_params(project_copy / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    projector = Projector(store.channels, seed=1)
    center = store.centers(("normal",), 1.0, 1024)["normal"]
    return params, store, projector, center


def test_score_store_on_rows_scores_exactly_those_images(project_copy: Path) -> None:
    params, store, projector, center = _store_and_model(project_copy)
    [everything] = score_store(store, [(projector, center)], params.score)
    rows = np.array([0, 2, 3, 6])
    pixel = pixel_accumulators(store, 1, params.score)
    [subset] = score_store(store, [(projector, center)], params.score, rows=rows, pixel=pixel)
    np.testing.assert_allclose(subset, everything[rows], rtol=0, atol=1e-6)
    assert pixel[0].result()["pixel_auroc"] == pytest.approx(_pixel_auroc_of(store, projector, center, params, rows))


def _pixel_auroc_of(store, projector, center, params, rows) -> float:
    features = store.features("test")[:][rows]
    maps, _ = score_batch(projector, center, torch.from_numpy(features), store.geometry.size, params.score.sigma,
                          params.score.reduction, params.score.topk, params.score.squared)
    return pixel_auroc(store.masks()[rows], maps.numpy())


def test_curve_scores_a_sample_before_the_last_checkpoint_and_everything_at_it(project_copy: Path) -> None:
    params, store, projector, center = _store_and_model(project_copy)
    n_test = store.features("test").shape[0]
    kinds = [s.defect_type for s in store.samples("test")]
    curve = LearningCurve(store, center, params.score, [1, 2, 5], sample_images=3, seed=9)
    assert len(curve.sample) < n_test and {kinds[i] for i in curve.sample} == set(kinds)
    for seen in (1, 2, 3, 4, 5):
        curve("normal", seen, projector)
    assert sorted(curve.points) == [1, 2, 5]
    # Every point on the same sample (a curve of like with like); the whole split at the end, as the result.
    assert [curve.points[s]["test_images"] for s in (1, 2, 5)] == [len(curve.sample)] * 3
    labels = np.array([s.label for s in store.samples("test")])
    [everything] = score_store(store, [(projector.float(), center)], params.score)
    assert curve.points[1]["image_auroc"] == image_auroc(labels[curve.sample], everything[curve.sample])
    assert curve.points[5]["image_auroc"] == curve.points[1]["image_auroc"]  # the projector did not change
    scores, pixel = curve.final
    np.testing.assert_allclose(scores, everything, rtol=0, atol=1e-6)
    assert len(pixel.result()) and image_auroc(labels, scores) == image_auroc(labels, everything)
    # 0 scores the whole split at every checkpoint, as before
    whole = LearningCurve(store, center, params.score, [1, 2], sample_images=0)
    whole("normal", 1, projector)
    assert whole.points[1]["test_images"] == n_test


def test_training_progress_averages_the_variants_and_never_goes_back() -> None:
    bar = tqdm(total=100, file=io.StringIO())
    seen: list[int] = []
    observe = both(ImagesSeen(bar, ["normal", "ones"]), None, lambda name, n, _: seen.append(n))
    steps = [("normal", 16), ("ones", 16), ("normal", 32), ("ones", 32), ("normal", 8), ("normal", 48), ("ones", 48)]
    for name, n in steps:
        observe(name, n, None)
    assert bar.n == 48  # lockstep variants advance it together; a retraining from 8 adds nothing until it passes 32
    assert seen == [n for _, n in steps]  # every observer sees every step
    # Variants trained one after the other (the direct trainer) each fill their share of the bar.
    sequential = tqdm(total=100, file=io.StringIO())
    observe = ImagesSeen(sequential, ["normal", "ones"])
    for n in (50, 100):
        observe("normal", n, None)
    assert sequential.n == 50
    for n in (50, 100):
        observe("ones", n, None)
    assert sequential.n == 100


def test_the_sample_held_in_memory_scores_as_the_store_does(project_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                             ) -> None:
    params, store, projector, center = _store_and_model(project_copy)
    held = LearningCurve(store, center, params.score, [1, 2], sample_images=3, seed=9)
    assert isinstance(held.source, CachedRows) and np.array_equal(held.source.rows, held.sample)
    monkeypatch.setattr(curves, "CACHE_BYTES", 0)
    read = LearningCurve(store, center, params.score, [1, 2], sample_images=3, seed=9)
    assert read.source is store
    for curve in (held, read):
        curve("normal", 1, projector)
    assert held.points[1] == read.points[1]
    # Reads of other rows go to the store.
    other = np.setdiff1d(np.arange(store.features("test").shape[0]), held.sample)[:2]
    np.testing.assert_array_equal(held.source.masks(other), store.masks(other))
    [a] = score_store(held.source, [(projector, center)], params.score, rows=other)
    [b] = score_store(store, [(projector, center)], params.score, rows=other)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="ascending"):
        next(store.chunks("test", 4, np.array([3, 1])))
