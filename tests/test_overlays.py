"""Overlays that show the defect: heat colours on the normal-map scale, colour bar with the threshold, ground-truth
panel, titles; predict and the analyze stage write them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polarocc.deploy.overlay import (
    BAR_STRIP,
    GAP,
    PREDICTION_RGB,
    TRUTH_RGB,
    HeatScale,
    colour_bar,
    heat_rgb,
    heat_scale,
    overlay_panels,
)
from polarocc.reports.figures import overlay_grid

# A realistic scale, measured on the pipeline's grass model (models/deploy/textures/grass.pt, 224 px crops):
# percentiles 50 and 99.9 of its normal training maps' pixels, and its threshold (quantile 0.99 of the normal
# images' scores, each the peak of a smoothed map). Its defective test pixels have a median of 414.
NORMAL_SCALE = (150.2, 287.7)
THRESHOLD = 364.0
DEFECT = 1.1 * THRESHOLD  # a defect just over the threshold: it must be bright, not mid-scale
BRIGHT, DARK = 200.0, 50.0  # luma (0..255) of a pixel that reads as bright / as dark


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])


def _synthetic(size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, map, defect mask): a normal background around the normal median and a hot disk at DEFECT."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    defect = (yy - 0.6 * size) ** 2 + (xx - 0.4 * size) ** 2 < (0.15 * size) ** 2
    anomaly_map = (NORMAL_SCALE[0] + 10.0 * rng.standard_normal((size, size))).astype(np.float32)
    anomaly_map[defect] = DEFECT
    image = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
    return image, anomaly_map, defect


def _heat_panel(overlay: Image.Image, size: int) -> np.ndarray:
    """The heat panel of an overlay: second panel, bottom-aligned (the titles sit above the panels)."""
    pixels = np.asarray(overlay)
    return pixels[-size:, size + GAP:2 * size + GAP]


def test_heat_panel_shows_the_defect_bright_and_the_background_dark() -> None:
    image, anomaly_map, defect = _synthetic()
    overlay = overlay_panels(image, anomaly_map, THRESHOLD, float(anomaly_map.max()), map_scale=NORMAL_SCALE)
    heat = _heat_panel(overlay, 64)
    np.testing.assert_array_equal(heat, heat_rgb(anomaly_map, heat_scale(anomaly_map, NORMAL_SCALE)))
    luma = _luma(heat)
    assert luma[defect].min() > BRIGHT
    assert np.median(luma[~defect]) < DARK

    # Today's rule, a fixed 0.5-1.5x threshold scale, puts the same defect at (400.4 - 182) / 364 = 0.6 of the
    # scale: a mid red, not bright. (The background is dark under both.)
    old = HeatScale(0.5 * THRESHOLD, 1.5 * THRESHOLD, "threshold")
    assert (DEFECT - old.low) / (old.high - old.low) == pytest.approx(0.6)
    assert _luma(heat_rgb(np.array([DEFECT]), old))[0] < 0.65 * BRIGHT


def test_ground_truth_panel_appears_exactly_when_a_mask_is_given() -> None:
    image, anomaly_map, defect = _synthetic()
    plain = overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, map_scale=NORMAL_SCALE)
    with_truth = overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, map_scale=NORMAL_SCALE, mask=defect)
    empty = overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, map_scale=NORMAL_SCALE,
                           mask=np.zeros_like(defect))  # a good image's mask: still ground truth
    assert with_truth.width == empty.width == plain.width + 64 + GAP
    assert with_truth.height == plain.height
    # The ground-truth panel sits before the prediction (the last panel): the mask's border is drawn in green.
    truth = np.asarray(with_truth)[-64:, -(2 * 64 + GAP):-(64 + GAP)]
    border = defect & ~np.pad(defect, 1)[2:, 1:-1]  # pixels of the mask with no mask pixel below
    assert (truth[border] == TRUTH_RGB).all(axis=1).mean() > 0.9
    assert not (truth[~defect] == TRUTH_RGB).all(axis=1).any()
    # The prediction panel outlines the region above the threshold in red.
    prediction = np.asarray(with_truth)[-64:, -64:]
    assert (prediction == PREDICTION_RGB).all(axis=2).any()
    with pytest.raises(ValueError, match="mask"):
        overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, mask=np.zeros((32, 32), bool))


def test_colour_bar_runs_over_the_scale_and_marks_the_threshold() -> None:
    scale = HeatScale(*NORMAL_SCALE, "normal maps")
    bar = np.asarray(colour_bar(scale, THRESHOLD, 224))
    strip = bar[:, BAR_STRIP // 2]
    red = set(np.flatnonzero((bar[:, 1] == PREDICTION_RGB).all(axis=1)))  # the threshold line and its tick
    rows = [y for y in np.flatnonzero(~(strip == 255).all(axis=1)) if y not in red]  # the strip's colours
    assert red and min(rows) - 2 <= min(red) and max(red) < max(rows)  # the threshold crosses the strip
    luma = _luma(strip[rows])
    assert luma[0] > BRIGHT and luma[-1] < DARK and (np.diff(luma) <= 1e-9).all()  # bright top to dark bottom
    # The axis reaches up to the threshold, above the scale's high end: the strip is saturated there.
    np.testing.assert_array_equal(strip[rows[0]], heat_rgb(np.array([scale.high]), scale)[0])
    np.testing.assert_array_equal(strip[rows[-1]], heat_rgb(np.array([scale.low]), scale)[0])
    assert (bar[:, BAR_STRIP + 6:] < 128).any()  # tick labels are written beside the strip

    # A threshold inside the scale is drawn where its value lies.
    middle = np.asarray(colour_bar(scale, sum(NORMAL_SCALE) / 2, 224))
    red_rows = np.flatnonzero((middle[:, 1] == PREDICTION_RGB).all(axis=1))
    assert abs(red_rows.mean() - 224 / 2) <= 2

    # A threshold far off the scale is marked by a triangle beyond the bar's end.
    far = np.asarray(colour_bar(scale, 10 * THRESHOLD, 224))
    far_strip = far[:, BAR_STRIP // 2]
    first = np.flatnonzero(~(far_strip == 255).all(axis=1))[0]
    assert (far_strip[first] == PREDICTION_RGB).all()

    # In the overlay the bar sits right of the heat panel.
    image, anomaly_map, _ = _synthetic()
    overlay = np.asarray(overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, map_scale=NORMAL_SCALE))
    small = np.asarray(colour_bar(scale, THRESHOLD, 64))
    x = 2 * (64 + GAP)
    np.testing.assert_array_equal(overlay[-64:, x:x + small.shape[1]], small)


def test_a_model_without_map_scale_still_renders_the_defect_bright() -> None:
    image, anomaly_map, defect = _synthetic()
    rng = np.random.default_rng(1)
    normal_scores = rng.uniform(235.0, 364.0, 100)  # the grass model's normal image scores span 236..364
    scale = heat_scale(anomaly_map, None, normal_scores)
    assert scale.rule == "normal scores" and scale.high == pytest.approx(np.median(normal_scores))
    assert scale.low == pytest.approx(min(np.median(anomaly_map), 0.5 * scale.high))
    overlay = overlay_panels(image, anomaly_map, THRESHOLD, DEFECT, normal_scores=normal_scores)
    luma = _luma(_heat_panel(overlay, 64))
    assert luma[defect].min() > BRIGHT and np.median(luma[~defect]) < DARK

    own = heat_scale(anomaly_map, None, ())  # neither: the map's own median to maximum
    assert own.rule == "own range" and own.high == pytest.approx(DEFECT) and own.low == np.median(anomaly_map)
    assert overlay_panels(image, anomaly_map, THRESHOLD, DEFECT).size == overlay.size
    flat = np.full((64, 64), 3.0, np.float32)  # a constant map keeps a usable scale
    assert heat_scale(flat).high > heat_scale(flat).low
    assert overlay_panels(image, flat, THRESHOLD, 3.0).width == overlay.width


def test_overlay_grid_rows_with_and_without_masks(tmp_path: Path) -> None:
    rows = [_synthetic(seed=s) for s in range(3)]
    images, maps, masks = (list(x) for x in zip(*rows, strict=True))
    scores = [float(m.max()) for m in maps]
    plain = overlay_grid(images, maps, scores, THRESHOLD, ["a", "b", "c"], tmp_path / "plain.png",
                         map_scale=NORMAL_SCALE)
    truth = overlay_grid(images, maps, scores, THRESHOLD, ["a", "b", "c"], tmp_path / "truth.png",
                         map_scale=NORMAL_SCALE, masks=masks)
    with Image.open(plain) as a, Image.open(truth) as b:
        assert a.format == b.format == "PNG"
        assert b.width == a.width + 64 + GAP and a.height == b.height


@pytest.fixture(scope="module")
def fitted(mvtec_tree: Path):
    from polarocc.detector.detector import Detector

    return Detector(resize=72, crop=64, epochs=2, batch_size=4, progress=False).fit(mvtec_tree / "brick/train/good")


def test_predict_writes_overlays_that_open_as_pngs(fitted, mvtec_tree: Path, tmp_path: Path) -> None:
    from polarocc.data.inputs import collect_images
    from polarocc.deploy.predict import choose_threshold, predict
    from polarocc.detector.detector import Detector

    images = collect_images([str(mvtec_tree / "brick/test")])
    scale = fitted.artefact.map_scale
    assert scale is not None and scale[0] < scale[1]
    older = Detector.from_artefact(replace(fitted.artefact, map_scale=None), progress=False)
    for name, detector in (("current", fitted), ("older", older)):
        table = predict(detector, images, tmp_path / name, choose_threshold(detector.artefact), batch_size=4,
                        progress=False)
        assert table.height == len(images)
        for overlay in table["overlay"].to_list():
            with Image.open(tmp_path / name / overlay) as png:
                assert png.format == "PNG" and png.mode == "RGB"
                assert png.width > 3 * 64 and png.height > 64  # image, heat + bar, prediction, and titles
    for first, second in zip(sorted((tmp_path / "current/overlays").iterdir()),
                             sorted((tmp_path / "older/overlays").iterdir()), strict=True):
        assert first.name == second.name


def test_analyze_overlays_use_the_model_scale_and_the_test_masks(fitted, project_copy: Path) -> None:
    from polarocc import layout
    from polarocc.config import load_params
    from polarocc.detector.artefact import save_artefact
    from polarocc.pipeline.analyze import overlays

    params = load_params(project_copy / "params.yaml")
    target = layout.deploy_model(params, "mine", "brick")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_artefact(target, fitted.artefact)
    overlays(params, "mine", "brick")
    with Image.open(layout.overlay_plot(params, "mine", "brick")) as png:
        grid = np.asarray(png.convert("RGB"))
    # Every row: image | heat map + bar | ground truth (green outline) | prediction, on the model's scale.
    model = fitted.artefact
    row = overlay_panels(np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64)), model.threshold.value, 0.0,
                         map_scale=model.map_scale, mask=np.zeros((64, 64), bool))
    assert grid.shape[1] == row.width and (grid == TRUTH_RGB).all(axis=2).any()
    assert grid.shape[0] == params.analysis.overlays_per_category * (row.height + 16)
