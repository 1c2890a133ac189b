"""Streaming pixel metrics: the exact and the fixed-memory binned accumulators against the array functions."""

from __future__ import annotations

import numpy as np
import pytest

from polarocc.errors import DataError
from polarocc.scoring.metrics import aupro, f1_max, pixel_auroc
from polarocc.scoring.pixel_metrics import (
    BinnedPixelMetrics,
    ExactPixelMetrics,
    order_key,
    pixel_metrics_for,
)


def _blobs(seed: int, images: int = 12, side: int = 24, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = np.zeros((images, side, side), dtype=bool)
    for i in range(images - 3):  # the last three images are defect-free
        for _ in range(rng.integers(1, 4)):
            y, x, h, w = rng.integers(0, side - 4, 2).tolist() + rng.integers(1, 7, 2).tolist()
            masks[i, y:y + h, x:x + w] = True
    maps = (rng.gamma(2.0, 1.0, masks.shape) + masks * rng.uniform(0.5, 3.0)).astype(np.float32)
    if ties:  # quantised maps: every distinct value is far from the next, so each has a bin of its own
        maps = np.round(maps * 8) / 8
    return maps, masks


def _feed(accumulator, maps: np.ndarray, masks: np.ndarray, batch: int) -> dict:
    for start in range(0, len(maps), batch):
        accumulator.add(maps[start:start + batch], masks[start:start + batch])
    return accumulator.result()


def test_order_key_orders_like_the_floats() -> None:
    values = np.array([-np.inf, -3e5, -2.0, -1e-30, -0.0, 0.0, 1e-30, 0.5, 0.5001, 2.0, 7e8, np.inf], np.float32)
    keys = order_key(values)
    assert (np.diff(keys) >= 0).all()
    assert order_key(np.float32([1.0]))[0] < order_key(np.float32([1.001]))[0]  # 2^-11 bins split them


@pytest.mark.parametrize("batch", [1, 5, 12])
def test_exact_accumulator_equals_the_array_functions(batch: int) -> None:
    maps, masks = _blobs(0)
    result = _feed(ExactPixelMetrics(), maps, masks, batch)
    assert result["pixel_auroc"] == pixel_auroc(masks, maps)
    assert result["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert result["pixel_f1_max"] == f1_max(masks, maps)
    assert result["pixel_metrics"] == "exact"


@pytest.mark.parametrize("seed", range(4))
def test_binned_is_exact_when_every_value_has_its_own_bin(seed: int) -> None:
    maps, masks = _blobs(seed, ties=True)
    binned = _feed(BinnedPixelMetrics(), maps, masks, 5)
    assert binned["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert binned["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert binned["pixel_f1_max"] == pytest.approx(f1_max(masks, maps), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_binned_stays_within_its_tie_bound_on_continuous_maps(seed: int) -> None:
    maps, masks = _blobs(seed)
    binned = _feed(BinnedPixelMetrics(), maps, masks, 4)
    exact = pixel_auroc(masks, maps)
    assert 0 < binned["pixel_auroc_tie_bound"] < 1e-3
    assert abs(binned["pixel_auroc"] - exact) <= binned["pixel_auroc_tie_bound"] + 1e-12
    assert binned["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-3)
    # Its thresholds are a subset of the exact ones, so its best F1 can only be lower, and barely.
    assert f1_max(masks, maps) - 1e-3 <= binned["pixel_f1_max"] <= f1_max(masks, maps) + 1e-12
    # Coarser keys tie more pixels: the bound grows and still holds.
    coarse = _feed(BinnedPixelMetrics(bits=14), maps, masks, 4)
    assert coarse["pixel_auroc_tie_bound"] > binned["pixel_auroc_tie_bound"]
    assert abs(coarse["pixel_auroc"] - exact) <= coarse["pixel_auroc_tie_bound"] + 1e-12


def test_binned_result_does_not_depend_on_batching_and_memory_is_fixed() -> None:
    maps, masks = _blobs(7)
    one = BinnedPixelMetrics()
    nbytes = one.normal.nbytes + one.defect.nbytes + one.overlap.nbytes
    first = _feed(one, maps, masks, 1)
    assert one.normal.nbytes + one.defect.nbytes + one.overlap.nbytes == nbytes == 3 * 8 * 2 ** 20
    assert _feed(BinnedPixelMetrics(), maps, masks, 12) == pytest.approx(first, abs=1e-12)


def test_pixel_auroc_alone_equals_the_full_result() -> None:
    maps, masks = _blobs(2)
    for accumulator in (ExactPixelMetrics(), BinnedPixelMetrics()):
        full = _feed(accumulator, maps, masks, 5)
        assert accumulator.pixel_auroc() == full["pixel_auroc"]


def test_accumulators_reject_bad_input() -> None:
    maps, masks = _blobs(1)
    for accumulator in (ExactPixelMetrics(), BinnedPixelMetrics()):
        with pytest.raises(ValueError, match="must both be"):
            accumulator.add(maps, masks[:, :-1])
        bad = maps.copy()
        bad[2, 3, 4] = np.nan
        with pytest.raises(FloatingPointError, match="NaN"):
            accumulator.add(bad, masks)
    with pytest.raises(DataError, match="defective"):
        _feed(BinnedPixelMetrics(), maps, np.zeros_like(masks), 4)


def test_pixel_metrics_for_switches_to_binned_above_the_budget() -> None:
    pixels = 100 * 224 * 224  # exact: 9 bytes each kept per model, 72 more while one model is computed
    assert all(isinstance(a, ExactPixelMetrics) for a in pixel_metrics_for(pixels, 2, 2048))
    assert all(isinstance(a, ExactPixelMetrics) for a in pixel_metrics_for(pixels, 2, 431))  # 430.7 MiB needed
    assert all(isinstance(a, BinnedPixelMetrics) for a in pixel_metrics_for(pixels, 2, 430))
    assert isinstance(pixel_metrics_for(1, 1, 0)[0], BinnedPixelMetrics)


def test_score_stage_streams_pixel_metrics_in_bounded_memory(extracted_project, tmp_path) -> None:
    import shutil
    from dataclasses import replace

    from polarocc.config import load_params
    from polarocc.pipeline.score import run_score
    from polarocc.pipeline.train import run_train

    folder = tmp_path / "project"
    shutil.copytree(extracted_project, folder)
    params = load_params(folder / "params.yaml")
    run_train(params, 1.0, progress=False)
    exact = run_score(params, 1.0, progress=False)
    binned = run_score(replace(params, score=replace(params.score, metrics_memory_mb=0)), 1.0, progress=False)
    for distribution, per_dataset in exact.items():
        for category, e in per_dataset["mine"].items():
            b = binned[distribution]["mine"][category]
            assert (e["pixel_metrics"], b["pixel_metrics"]) == ("exact", "binned (20-bit score keys)")
            assert b["image_auroc"] == e["image_auroc"] and b["scores"] == e["scores"]
            assert b["polar"] == e["polar"]
            assert abs(b["pixel_auroc"] - e["pixel_auroc"]) <= b["pixel_auroc_tie_bound"] < 1e-3
            assert b["aupro"] == pytest.approx(e["aupro"], abs=1e-3)


def test_exact_metrics_take_images_of_different_sizes() -> None:
    # `polarocc fit --test` scores each image at its own size; the metrics read all pixels as one list.
    rng = np.random.default_rng(3)
    shapes = [(20, 30), (25, 16), (20, 30)]
    maps = [rng.random(shape).astype(np.float32) for shape in shapes]
    masks = [np.zeros(shape, dtype=bool) for shape in shapes]
    masks[0][2:6, 3:9] = masks[1][10:14, 4:8] = True
    for m, k in zip(maps, masks, strict=True):
        m[k] += 0.5
    mixed = ExactPixelMetrics()
    for m, k in zip(maps, masks, strict=True):
        mixed.add(m[None], k[None])
    flat_maps = np.concatenate([m.ravel() for m in maps])
    flat_masks = np.concatenate([k.ravel() for k in masks])
    result = mixed.result()
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(flat_masks, flat_maps), abs=1e-12)
    same = ExactPixelMetrics()  # the first and last images again, as one same-size batch
    same.add(np.stack([maps[0], maps[2]]), np.stack([masks[0], masks[2]]))
    alone = ExactPixelMetrics()
    alone.add(maps[0][None], masks[0][None])
    alone.add(maps[2][None], masks[2][None])
    assert same.result() == alone.result()
