"""Backbone: offline weights load strictly, multi-scale shapes, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data

from polarocc.errors import ConfigError, WeightsError
from polarocc.models.backbone import MultiScaleAggregator, build_extractor
from polarocc.models.weights import convert_efficientnet_pytorch, converted_package_weights, package_weights_path


def test_package_weights_load_strictly_and_classify() -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    state = torch.load(package_weights_path(), map_location="cpu", weights_only=True)
    converted = convert_efficientnet_pytorch(state, [len(s) for s in model.blocks])
    assert len(converted) == len(state) == 296
    model.load_state_dict(converted, strict=True)
    # Genuine ImageNet weights: scikit-image's cat photo is classified as a cat (classes 281-285).
    image = torch.from_numpy(np.asarray(data.chelsea(), dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = int(model((image - 0.5) / 0.5).argmax())
    assert 281 <= top <= 285
    assert converted_package_weights().is_file()


def test_lite0_multiscale_shapes(lite0) -> None:
    images = torch.randint(0, 256, (2, 224, 224, 3), dtype=torch.uint8)
    features = lite0(images)
    assert features.shape == (2, 24 + 40 + 112, 56, 56)
    levels = lite0.raw_forward(images)
    assert [tuple(x.shape[1:]) for x in levels] == [(24, 56, 56), (40, 28, 28), (112, 14, 14)]
    spec = lite0.spec(224)
    assert (spec.channels, spec.height, spec.width) == (176, 56, 56)
    assert spec.mean == (0.5, 0.5, 0.5)


def test_aggregator_pools_upsamples_concatenates() -> None:
    levels = [torch.ones(1, 2, 8, 8), torch.full((1, 3, 4, 4), 2.0)]
    out = MultiScaleAggregator(pool=3)(levels)
    assert out.shape == (1, 5, 8, 8)
    # 3x3 average pooling with zero padding counts the padding: a corner of ones averages to 4/9
    assert float(out[0, 0, 0, 0]) == pytest.approx(4 / 9)
    assert float(out[0, 0, 4, 4]) == pytest.approx(1.0)
    assert MultiScaleAggregator(pool=1)(levels)[0, 2:, 3, 3].tolist() == [2.0, 2.0, 2.0]


def test_other_timm_backbone_random_weights() -> None:
    extractor = build_extractor("resnet18", (1, 2), weights="none")
    out = extractor(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    assert out.shape == (1, 64 + 128, 16, 16)


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"no model named 'resnet9000'"):
        build_extractor("resnet9000", (1,))
    with pytest.raises(WeightsError, match=r"holds weights for tf_efficientnet_lite0 only"):
        build_extractor("resnet18", (1,), weights="package")
    with pytest.raises(WeightsError, match=r"no weights file at .*missing.pth"):
        build_extractor("resnet18", (1,), weights=str(Path("/nonexistent/missing.pth")))
    with pytest.raises(ConfigError, match=r"backbone.layers"):
        build_extractor("resnet18", (1, 9), weights="none")


def test_local_weights_file(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    extractor = build_extractor("resnet18", (1,), weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(extractor.backbone.conv1.weight, reference.conv1.weight)


def test_hub_without_network_says_what_to_do() -> None:
    import os
    import subprocess
    import sys

    code = ("from polarocc.models.backbone import build_extractor\n"
            "build_extractor('resnet18', (1,), weights='hub')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode != 0
    assert "WeightsError" in result.stderr and "set backbone.weights to a local weights file" in result.stderr
