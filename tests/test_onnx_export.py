"""ONNX export: one graph from uint8 images to scores and maps that onnxruntime runs alone, as the torch path scores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from polarocc.cli import app
from polarocc.data.images import Geometry, load_image
from polarocc.data.inputs import collect_images
from polarocc.deploy.onnx_export import export_artefact_onnx, export_onnx
from polarocc.detector.artefact import ModelArtefact, Threshold, load_artefact, save_artefact
from polarocc.detector.detector import Detector
from polarocc.errors import ConfigError, UnsafePathError
from polarocc.models.projector import Projector
from polarocc.models.tiling import for_geometry

runner = CliRunner()
GEOMETRY = Geometry(72, 64)
DEFAULT_SCORE = {"sigma": 4, "reduction": "max", "topk": 10, "squared": True}
THRESHOLD = 1234.5
TOLERANCE = 1e-4  # relative, on scores and on maps (against the map's largest value)


def make_artefact(extractor, score: dict, geometry: Geometry = GEOMETRY) -> ModelArtefact:
    """An untrained model on ``extractor``: a seeded random projector and a random center of norm 1."""
    spec = for_geometry(extractor, geometry).spec(geometry.size)
    center = torch.randn(spec.channels, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return ModelArtefact(
        projector=Projector(spec.channels, "conv1x1", True, seed=11).state(), center=center / center.norm(),
        backbone=dict(extractor.description), geometry=geometry.record(),
        feature_shape=(spec.channels, spec.height, spec.width), score=dict(score),
        threshold=Threshold(THRESHOLD, "user"))


@pytest.fixture(scope="module")
def images(mvtec_tree: Path) -> np.ndarray:
    """Four real texture images (normal and defective), resized and cropped as the model expects."""
    paths = collect_images([str(mvtec_tree / "brick/test")])
    return np.stack([load_image(p, GEOMETRY) for p in paths[:4]])


@pytest.fixture(scope="module")
def artefact(lite0) -> ModelArtefact:
    return make_artefact(lite0, DEFAULT_SCORE)


@pytest.fixture(scope="module")
def exported(artefact: ModelArtefact, lite0, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_artefact_onnx(artefact, tmp_path_factory.mktemp("onnx") / "brick.onnx", extractor=lite0)


def torch_detector(artefact: ModelArtefact, extractor=None) -> Detector:
    """The torch path: the Detector the CLI's predict uses, on the CPU."""
    return Detector.from_artefact(artefact, "cpu", extractor, progress=False)


def run_onnx(path: Path, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    score, anomaly_map = session.run(["score", "anomaly_map"], {"images": batch})
    return score, anomaly_map


def relative_differences(onnx: tuple[np.ndarray, np.ndarray],
                         torch_: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    """(max relative score difference, max map difference relative to the torch map's largest value) between
    onnxruntime's (scores, maps) and Detector.score_inputs's (maps, scores)."""
    (score, maps), (torch_maps, torch_scores) = onnx, torch_
    assert score.shape == torch_scores.shape and maps.shape == torch_maps.shape
    scores = float(np.max(np.abs(score - torch_scores) / np.abs(torch_scores)))
    return scores, float(np.max(np.abs(maps - torch_maps)) / np.max(np.abs(torch_maps)))


def check_matches(path: Path, detector: Detector, images: np.ndarray) -> tuple[float, float]:
    """ONNX scores and maps of a batch of four and a batch of one (the batch axis is dynamic) agree with torch."""
    expected = detector.score_inputs(images)
    worst = relative_differences(run_onnx(path, images), expected)
    one = relative_differences(run_onnx(path, images[:1]), (expected[0][:1], expected[1][:1]))
    assert max(*worst, *one) <= TOLERANCE, (worst, one)
    print(f"max relative difference: scores {worst[0]:.2e}, maps {worst[1]:.2e}; {path.stat().st_size} bytes")
    return worst


def test_onnx_scores_like_torch(exported: Path, artefact: ModelArtefact, lite0, images: np.ndarray) -> None:
    check_matches(exported, torch_detector(artefact, lite0), images)
    assert not any(module.training for module in lite0.modules())  # the export left the shared backbone in eval

    meta = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = meta.custom_metadata_map
    assert meta.producer_name == "polarocc"
    assert (props["crop"], props["resize"], float(props["threshold"])) == ("64", "72", THRESHOLD)
    assert props["score_reduction"] == "max" and props["backbone"] == "tf_efficientnet_lite0"
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"] and session.get_inputs()[0].type == "tensor(uint8)"
    assert [o.name for o in session.get_outputs()] == ["score", "anomaly_map"]


@pytest.mark.parametrize("score", [{"sigma": 2, "reduction": "topk", "topk": 10, "squared": False},
                                   {"sigma": 0, "reduction": "mean", "topk": 10, "squared": True},
                                   {**DEFAULT_SCORE, "feature_dtype": "float16"}])
def test_onnx_follows_the_score_settings(score: dict, lite0, images: np.ndarray, tmp_path: Path) -> None:
    artefact = make_artefact(lite0, score)
    detector = torch_detector(artefact, lite0)
    before = detector.score_inputs(images)
    path = export_artefact_onnx(artefact, tmp_path / "m.onnx", extractor=lite0)
    check_matches(path, detector, images)
    # Exporting changes nothing in the shared backbone (its batch norms stay in eval mode): same torch scores.
    np.testing.assert_array_equal(detector.score_inputs(images)[1], before[1])


ISOLATED = r"""
import sys

class Refuse:
    # Any attempt to import polarocc, timm or torch fails: the graph must not need them.
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("polarocc", "timm", "torch"):
            raise ModuleNotFoundError(f"{name} is blocked")

sys.meta_path.insert(0, Refuse())
import numpy as np
import onnxruntime as ort

model, batch, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
crop = int(session.get_modelmeta().custom_metadata_map["crop"])
score, anomaly_map = session.run(["score", "anomaly_map"], {"images": np.load(batch)})
assert anomaly_map.shape[1:] == (crop, crop)
np.savez(out, score=score, anomaly_map=anomaly_map)
print(sorted(m for m in sys.modules if m.partition(".")[0] in ("polarocc", "timm", "torch")))
"""


@pytest.mark.integration  # a subprocess, like the project's other subprocess tests
def test_onnx_runs_with_onnxruntime_alone(exported: Path, artefact: ModelArtefact, lite0, images: np.ndarray,
                                          tmp_path: Path) -> None:
    np.save(tmp_path / "batch.npy", images)
    result = subprocess.run([sys.executable, "-I", "-c", ISOLATED, str(exported), str(tmp_path / "batch.npy"),
                             str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
    out = np.load(tmp_path / "out.npz")
    worst = relative_differences((out["score"], out["anomaly_map"]),
                                 torch_detector(artefact, lite0).score_inputs(images))
    assert max(worst) <= TOLERANCE, worst


def one_line_error(result, expected: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output


def test_cli_converts_a_model_file(artefact: ModelArtefact, lite0, images: np.ndarray, tmp_path: Path) -> None:
    model = save_artefact(tmp_path / "brick.pt", artefact)
    out = tmp_path / "out" / "brick.onnx"
    for _ in range(2):  # the second run replaces the ONNX file it wrote
        result = runner.invoke(app, ["export", "--model", str(model), str(out), "--format", "onnx"])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"wrote {out}"
    check_matches(out, torch_detector(artefact, lite0), images)
    assert not [p for p in out.parent.iterdir() if p.name != "brick.onnx"]  # no temporary left behind

    copy = tmp_path / "copy.pt"
    result = runner.invoke(app, ["export", "--model", str(model), str(copy)])  # --format torch: a checked copy
    assert result.exit_code == 0 and result.output.strip() == f"wrote {copy}", result.output
    assert load_artefact(copy).score == artefact.score

    foreign = tmp_path / "notes.onnx"
    foreign.write_text("mine")
    one_line_error(runner.invoke(app, ["export", "--model", str(model), str(foreign), "--format", "onnx"]),
                   "polarocc never overwrites files it did not create")
    assert foreign.read_text() == "mine"
    with pytest.raises(UnsafePathError):
        export_onnx(lite0, Projector(176), torch.ones(176), Geometry(64, 64), DEFAULT_SCORE, foreign)


def test_cli_usage_errors_are_one_line(tmp_path: Path) -> None:
    model = str(tmp_path / "m.pt")
    one_line_error(runner.invoke(app, ["export", "--model", model]), "with --model give only the output file")
    one_line_error(runner.invoke(app, ["export", "--model", model, "a", "b"]), "with --model give only")
    one_line_error(runner.invoke(app, ["export", "--model", model, "o.onnx", "--norm", "4"]), "leave them out")
    one_line_error(runner.invoke(app, ["export", "brick"]), "give CATEGORY and OUT")
    one_line_error(runner.invoke(app, ["export", "--model", model, str(tmp_path / "o.onnx"), "--format", "onnx"]),
                   "no saved model")


def test_missing_onnx_names_the_fix(artefact: ModelArtefact, lite0, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now raises ImportError
    hint = 'pip install "polarocc[onnx]"'
    with pytest.raises(ConfigError, match=r'pip install "polarocc\[onnx\]"'):
        export_onnx(lite0, Projector(176), torch.ones(176), Geometry(64, 64), DEFAULT_SCORE, tmp_path / "m.onnx")
    model = save_artefact(tmp_path / "m.pt", artefact)
    one_line_error(runner.invoke(app, ["export", "--model", str(model), str(tmp_path / "m.onnx"), "--format", "onnx"]),
                   hint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


@pytest.mark.integration  # trains the Protocol B variants first
def test_cli_exports_a_pipeline_variant(project_copy: Path, images: np.ndarray, tmp_path: Path) -> None:
    from polarocc.config import load_params
    from polarocc.pipeline.export import export_variant
    from polarocc.pipeline.train import run_train

    params = load_params(project_copy / "params.yaml")
    run_train(params, 1.0, progress=False)
    out = tmp_path / "gravel.onnx"
    result = runner.invoke(app, ["export", "gravel", str(out), "--format", "onnx", "--norm", "1", "--params",
                                 str(project_copy / "params.yaml")])
    assert result.exit_code == 0 and result.output.strip() == f"wrote {out}", result.output
    artefact = load_artefact(export_variant(params, 1.0, params.center.distribution, "mine", "gravel",
                                            tmp_path / "gravel.pt"))
    props = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert float(props["threshold"]) == artefact.threshold.value
    check_matches(out, torch_detector(artefact), images)


@pytest.mark.parametrize("geometry", [Geometry((80, 200), None),
                                      Geometry((80, 200), None, {"size": 64, "overlap": 0.25})],
                         ids=["full_frame", "tiled"])
def test_onnx_follows_the_geometry(geometry: Geometry, lite0, mvtec_tree: Path, tmp_path: Path) -> None:
    """A rectangular full-frame input, and the same tiled (the graph holds every tile and the stitching)."""
    artefact = make_artefact(lite0, DEFAULT_SCORE, geometry)
    paths = collect_images([str(mvtec_tree / "brick/test")])[:2]
    batch = np.stack([load_image(p, geometry) for p in paths])
    assert batch.shape == (2, 80, 200, 3)
    path = export_artefact_onnx(artefact, tmp_path / "m.onnx", extractor=lite0)
    check_matches(path, torch_detector(artefact, lite0), batch)
    props = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    assert (props["input_height"], props["input_width"], props["crop"]) == ("80", "200", "null")
    assert ("tiles" in props) == (geometry.tiles is not None)
