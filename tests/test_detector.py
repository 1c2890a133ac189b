"""polarocc.Detector: inputs checked before work, the pipeline's trainer, calibrated thresholds, maps at each image's
own size, and files that round-trip."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polarocc
from polarocc import layout
from polarocc.config import load_params
from polarocc.data.images import Geometry
from polarocc.detector.detector import Detector
from polarocc.detector.images import as_images, map_to_image
from polarocc.detector.stores import fit_store
from polarocc.errors import ConfigError, DataError, ModelError
from polarocc.features.store import FeatureStore

SMALL = {"resize": 72, "crop": 64, "epochs": 2, "batch_size": 4, "progress": False}


def _good(mvtec_tree: Path, category: str = "brick") -> Path:
    return mvtec_tree / category / "train" / "good"


def _images(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png"))


@pytest.fixture(scope="module")
def fitted(mvtec_tree: Path) -> Detector:
    return Detector(**SMALL).fit(_good(mvtec_tree))


def test_polarocc_exports_the_detector() -> None:
    assert polarocc.Detector is Detector
    assert "Detector" in polarocc.__all__


def test_float_images_in_0_1_score_as_their_uint8_form_and_others_are_refused(fitted: Detector,
                                                                             mvtec_tree: Path) -> None:
    pixels = np.asarray(Image.open(_images(_good(mvtec_tree))[0]).convert("RGB"))
    as_float = pixels.astype(np.float32) / 255.0
    assert fitted.score(as_float) == pytest.approx(fitted.score(pixels), rel=0, abs=0)
    with pytest.raises(DataError, match=r"images: float images must hold values in \[0, 1\], got \d+\.\.\d+"):
        fitted.score(pixels.astype(np.float64))
    with pytest.raises(DataError, match=r"must be uint8 .* got uint16"):
        fitted.score(pixels.astype(np.uint16))
    with pytest.raises(DataError, match=r"shape \(4, 5, 7\)"):
        fitted.score(np.zeros((4, 5, 7), dtype=np.uint8))
    with pytest.raises(DataError, match="NaN or Inf"):
        fitted.score(np.full((8, 8), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match="cannot read images from a dict"):
        fitted.score({"a": 1})
    gray = pixels[..., 0]
    assert fitted.score([gray, Image.fromarray(gray)]).shape == (2,)


def test_a_folder_without_images_and_a_missing_path_fail_by_name(tmp_path: Path) -> None:
    empty = re.escape(f"folder {tmp_path} holds no images")
    with pytest.raises(DataError, match=empty):
        as_images(tmp_path)
    with pytest.raises(DataError, match=r"nowhere\.png is not an image file"):
        as_images(tmp_path / "nowhere.png")


def test_bad_params_fail_before_any_work_naming_the_parameter(mvtec_tree: Path) -> None:
    with pytest.raises(ConfigError, match="Detector parameter 'epochs' must be"):
        Detector(epochs=0).fit(_good(mvtec_tree))
    interval = re.escape("Detector parameter 'holdout' must be a finite number in [0, 1)")
    with pytest.raises(ConfigError, match=interval):
        Detector(holdout=1.0).fit(_good(mvtec_tree))
    with pytest.raises(ConfigError, match=r"Detector parameter 'center' must be one of normal, uniform"):
        Detector(center="gaussian").fit(_good(mvtec_tree))
    with pytest.raises(ConfigError, match="timm has no model named 'resnet_typo'"):
        Detector(backbone="resnet_typo", progress=False).fit(_good(mvtec_tree))
    with pytest.raises(ModelError, match="not fitted"):
        Detector().score(_good(mvtec_tree))


def test_fit_holds_out_a_seeded_fraction_and_sets_the_threshold_on_it(fitted: Detector, mvtec_tree: Path) -> None:
    artefact = fitted.artefact
    n = len(_images(_good(mvtec_tree)))
    held = round(0.2 * n) or 1
    assert artefact.provenance["trained_on"] == n - held
    assert artefact.threshold.rule == "holdout_quantile" and artefact.threshold.window == held
    assert len(artefact.normal_scores) == held
    assert artefact.threshold.value == max(artefact.normal_scores)  # quantile 0.99 of a few scores: the largest
    assert artefact.map_scale[0] < artefact.map_scale[1]
    again = Detector(**SMALL).fit(_good(mvtec_tree))
    assert torch.equal(again.artefact.projector["weight"], artefact.projector["weight"])  # seeded: reproducible


def test_maps_come_back_at_each_images_own_size(fitted: Detector, mvtec_tree: Path) -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (50, 90, 3), dtype=np.uint8), rng.integers(0, 256, (120, 40), dtype=np.uint8)]
    maps = fitted.anomaly_maps(images)
    assert [m.shape for m in maps] == [(50, 90), (120, 40)]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in maps)
    scores, both = fitted.score_and_maps(images)
    assert np.array_equal(scores, fitted.score(images))
    assert all(np.array_equal(a, b) for a, b in zip(maps, both, strict=True))
    assert fitted.predict(images).dtype == bool


def test_map_to_image_puts_the_crop_where_it_came_from() -> None:
    geometry = Geometry(8, 4)
    crop_map = np.arange(16, dtype=np.float32).reshape(4, 4)
    full = map_to_image(crop_map, geometry, (8, 8))  # the same size as the resize: no interpolation
    assert np.array_equal(full[2:6, 2:6], crop_map)
    assert np.array_equal(full[0, 2:6], crop_map[0]) and np.array_equal(full[2:6, 7], crop_map[:, -1])


def test_save_and_load_round_trip_with_weights_only(fitted: Detector, mvtec_tree: Path, tmp_path: Path) -> None:
    path = fitted.save(tmp_path / "model.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "polarocc-model" and payload["map_scale"] == fitted.artefact.map_scale
    loaded = Detector.load(path, progress=False)
    images = _images(mvtec_tree / "brick" / "test")
    assert np.array_equal(loaded.score(images), fitted.score(images))
    assert loaded.threshold == fitted.threshold
    assert loaded.get_params()["crop"] == 64 and loaded.get_params()["epochs"] == 2
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="never overwrites files it did not create"):
        fitted.save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_fit_trains_what_the_pipeline_trains_on_the_same_images(extracted_project: Path) -> None:
    # The store holds every training image's features as the pipeline extracted them; the Detector computes
    # them itself and trains with the same trainer (streamed statistics here, stored there: equal to 1e-10).
    params = load_params(extracted_project / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    [(projector, center, history)] = fit_store(store, params, 1.0, ("normal",)).values()
    b, t = params.backbone, params.train
    detector = Detector(resize=b.resize, crop=b.crop, epochs=t.epochs, batch_size=t.batch_size, holdout=0,
                        progress=False, feature_dtype=params.extract.dtype)
    detector.fit([s.path for s in store.samples("train")])
    # The file keeps float32 weights (what every scorer reads); the float64 training agrees to 1e-10, so the
    # files agree to float32 rounding, and the loss of every epoch (float64) to 1e-9.
    weight = detector.artefact.projector["weight"]
    assert weight.dtype == torch.float32
    assert torch.allclose(weight.double(), projector.weight.detach(), rtol=1.2e-7, atol=0)
    assert torch.equal(detector.artefact.center, center)
    trained = detector.artefact.train["history"]
    assert trained["steps"] == history.steps and trained["trainer"] == history.trainer == "gram"
    np.testing.assert_allclose(trained["loss"], history.loss, rtol=1e-9)
    assert detector.artefact.threshold.rule == "quantile"  # holdout 0: the training images' own scores


def test_too_few_images_to_hold_some_out(mvtec_tree: Path) -> None:
    one = _images(_good(mvtec_tree))[:1]
    with pytest.raises(DataError, match="leaves none to train on"):
        Detector(**SMALL).fit(one)
    assert Detector(**{**SMALL, "holdout": 0}).fit(one).threshold > 0
