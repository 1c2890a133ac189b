"""Protocol A: pooled features, one-vs-rest training and scoring."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from polarocc.config import parse_params
from polarocc.detector.protocol_a import fit_class, score_class
from polarocc.errors import ConfigError
from polarocc.layout import file_stem
from polarocc.models.backbone import build_pooled_extractor
from polarocc.models.projector import Projector


def test_pooled_features_are_the_penultimate_layer() -> None:
    extractor = build_pooled_extractor("tf_efficientnet_lite0")
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    features = extractor(images)
    assert features.shape == (2, 1280, 1, 1) and extractor.spec(64).channels == 1280
    # the classifier applied to these features gives the network's own logits
    with torch.no_grad():
        logits = extractor.backbone(extractor.normalize(images))
        torch.testing.assert_close(extractor.backbone.classifier(features.flatten(1)), logits)


def test_one_vs_rest_separates_clusters(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["train"]["lr"] = 0.01  # a budget large enough to pull the normal class onto the center
    raw["protocol_a"]["epochs"] = 100
    params = parse_params(raw)
    rng = np.random.default_rng(0)
    means = rng.normal(size=(3, 16)) * 3
    train_labels = np.repeat(np.arange(3), 40)
    test_labels = np.repeat(np.arange(3), 20)
    train = (means[train_labels] + rng.normal(size=(120, 16)))[:, :, None, None].astype(np.float32)
    test = (means[test_labels] + rng.normal(size=(60, 16)))[:, :, None, None].astype(np.float32)
    for label in range(3):
        projector, center, history = fit_class(train, train_labels, label, params, 1.0, "normal")
        assert history.steps == 100  # 40 images fit one batch of 64: one step per epoch
        assert history.loss[-1] < history.loss[0] / 10
        result = score_class(test, test_labels, label, projector, center)
        assert result["protocol"] == "A" and result["n_anomalous"] == 40 and result["pixel_auroc"] is None
        assert result["image_auroc"] > 0.9


def test_projector_on_single_positions_matches_conv() -> None:
    projector = Projector(6)
    x = torch.randn(4, 6, 1, 1)
    expected = torch.nn.functional.conv2d(x, projector.weight[:, :, None, None], projector.bias)
    torch.testing.assert_close(projector(x), expected)


def test_file_stem() -> None:
    assert file_stem("T-shirt/top") == "T-shirt_top" and file_stem("7") == "7" and file_stem("metal_nut") == "metal_nut"


def test_protocol_a_params(default_params: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(default_params)
    raw["protocol_a"]["datasets"]["cifar"] = {"format": "cifar10", "path": None}
    with pytest.raises(ConfigError, match=r"protocol_a.datasets.cifar.path"):
        parse_params(raw)
    raw["protocol_a"]["datasets"]["cifar"] = {"format": "svhn", "path": "x"}
    with pytest.raises(ConfigError, match=r"protocol_a.datasets.cifar.format"):
        parse_params(raw)
    raw["protocol_a"]["datasets"] = {"textures": {"format": "digits"}}
    with pytest.raises(ConfigError, match=r"name of a Protocol B dataset"):
        parse_params(raw)


def test_mvtec_image_level_end_to_end(params_dict: dict, mvtec_tree: Path, tmp_path: Path) -> None:
    from polarocc import layout
    from polarocc.config import load_params
    from polarocc.detector.model_files import save_model
    from polarocc.detector.protocol_a import fit_all, run_extract_a, score_all
    from tests.conftest import write_params

    params_dict["protocol_a"] = {"datasets": {"mv": {"format": "mvtec", "path": str(mvtec_tree)}},
                                 "resize": 32, "crop": 32, "epochs": 2, "batch_size": 4}
    params_dict["sweep"]["distributions"] = ["normal"]
    params = load_params(write_params(params_dict, tmp_path))
    computed = run_extract_a(params, "mv", progress=False)
    assert computed == {"train": 1, "test": 1}  # 12 train and 14 test images fit one 64-image shard
    for distribution, dataset, name, store, projector, center, _ in fit_all(params, 1.0):
        save_model(layout.model_file(params, 1.0, distribution, dataset, name), projector, center,
                   {"store_fingerprint": store.attrs["fingerprint"]})
    results = score_all(params, 1.0)["normal"]["mv"]
    assert set(results) == {"brick", "gravel"}
    for result in results.values():  # within-category: 3 good against 4 defective test images
        assert result["n_test"] == 7 and result["n_anomalous"] == 4
        assert 0.0 <= result["image_auroc"] <= 1.0


def test_unknown_class_stops_before_extraction(params_dict: dict, tmp_path: Path) -> None:
    from polarocc.config import load_params
    from polarocc.detector.protocol_a import run_extract_a
    from polarocc.errors import DataError
    from tests.conftest import write_params

    params_dict["protocol_a"]["datasets"]["digits"]["classes"] = ["0", "eleven"]
    params = load_params(write_params(params_dict, tmp_path))
    with pytest.raises(DataError, match=r"eleven not in the dataset; its classes are 0, 1, 2"):
        run_extract_a(params, "digits", progress=False)
    assert not (tmp_path / "data").exists()


@pytest.mark.integration
def test_protocol_a_check_stage(params_dict: dict, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import ROOT, write_params

    folder = tmp_path / "pets"
    for split in ("train", "test"):
        for name in ("cat", "dog"):
            (folder / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(folder / split / name / "0.png")
    params_dict["protocol_a"]["datasets"] = {"pets": {"format": "image_folder", "path": str(folder)},
                                             "gone": {"format": "cifar10", "path": str(tmp_path / "nowhere")}}
    write_params(params_dict, tmp_path)

    def check(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "stages/check.py"), name], cwd=tmp_path,
                              capture_output=True, text=True)

    missing = check("gone")
    assert missing.returncode == 2 and "protocol_a.datasets.gone.path" in missing.stderr
    (tmp_path / "nowhere").mkdir()
    empty_folder = check("gone")
    assert empty_folder.returncode == 2
    assert "protocol_a.datasets.gone.path" in empty_folder.stderr and "data_batch_1" in empty_folder.stderr
    ok = check("pets")
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "reports/checks/pets.json").read_text())["classes"] == ["cat", "dog"]
    (folder / "test/dog/0.png").write_bytes(b"broken")
    broken = check("pets")
    assert broken.returncode == 2 and "test/dog/0.png" in broken.stderr
