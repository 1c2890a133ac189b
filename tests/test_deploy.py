"""Saved models, thresholds, `predict` and the online `stream`: on generated data, with the Lite0 backbone."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from polarocc import layout
from polarocc.config import load_params
from polarocc.data.images import Geometry, load_image
from polarocc.data.inputs import collect_images, output_names
from polarocc.deploy.predict import choose_threshold, predict
from polarocc.deploy.stream import OnlineLearner, StreamSettings, cold_start_artefact, run_stream
from polarocc.detector.artefact import load_artefact, save_artefact
from polarocc.detector.detector import Detector
from polarocc.detector.stores import score_store
from polarocc.detector.threshold import held_out_rows
from polarocc.errors import ConfigError, DataError, ModelError
from polarocc.features.store import FeatureStore
from polarocc.pipeline.export import export_variant
from polarocc.pipeline.online import run_online
from polarocc.pipeline.train import run_train
from polarocc.training.direct import train_direct
from polarocc.training.schedule import epoch_batches


@pytest.fixture(scope="module")
def trained(extracted_project: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project after the online stage and train@1: saved Protocol C models and trained Protocol B variants."""
    folder = tmp_path_factory.mktemp("deploy") / "project"
    shutil.copytree(extracted_project, folder)
    params = load_params(folder / "params.yaml")
    run_online(params, "mine", progress=False)
    run_train(params, 1.0, progress=False)
    return folder


@pytest.fixture(scope="module")
def model_path(trained: Path) -> Path:
    return layout.online_model(load_params(trained / "params.yaml"), "mine", "brick")


def _test_images(mvtec_tree: Path) -> list[Path]:
    return collect_images([str(mvtec_tree / "brick/test")])


def test_model_file_describes_itself_and_scores_like_the_pipeline(trained: Path, model_path: Path, lite0) -> None:
    model = load_artefact(model_path)
    assert model.backbone["name"] == "tf_efficientnet_lite0" and model.backbone["weights"] == "package"
    assert model.backbone["layers"] == [1, 2, 3] and model.geometry == {"resize": 72, "crop": 64}
    assert model.feature_shape == (176, 16, 16)
    assert model.score == {"sigma": 4, "reduction": "max", "topk": 10, "squared": True, "feature_dtype": "float16"}
    assert model.threshold.rule == "quantile" and model.threshold.quantile == 0.99
    assert {"polarocc", "torch", "timm"} <= set(model.versions)

    # Scoring the training images from their files reproduces the normal scores saved from the cache: the
    # features are rounded to the cache's float16 on the way, so both paths score the same numbers.
    params = load_params(trained / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    images = np.stack([load_image(s.path, Geometry(72, 64)) for s in store.samples("train")])
    _, scores = Detector.from_artefact(model, extractor=lite0).score_inputs(images)
    np.testing.assert_allclose(scores, model.normal_scores, rtol=1e-5)


def test_export_any_trained_variant(trained: Path, tmp_path: Path) -> None:
    params = load_params(trained / "params.yaml")
    out = export_variant(params, 1.0, "ones", "mine", "gravel", tmp_path / "gravel.pt")
    model = load_artefact(out)
    assert model.provenance == {**model.provenance, "protocol": "B", "distribution": "ones", "norm": 1.0,
                                "trained_on": 5, "held_out": 1}  # deploy.holdout 0.2 of 6 training images
    assert model.train["epochs"] == 3 and len(model.train["history"]["loss"]) == 3
    store = FeatureStore(layout.feature_store(params, "mine", "gravel"))
    [scores] = score_store(store, [(model.build_projector(), model.center)], params.score, split="train")
    held = held_out_rows(6, params.deploy.holdout, params.train.seed)
    assert model.normal_scores == pytest.approx(scores[held].tolist())  # the held-out image's score, as scored
    assert model.threshold.rule == "holdout_quantile" and model.threshold.value == max(model.normal_scores)
    # holdout 0: the sweep's own model, its threshold from every training image's (in-sample) score.
    in_sample = replace(params, deploy=replace(params.deploy, holdout=0.0))
    model = load_artefact(export_variant(in_sample, 1.0, "ones", "mine", "gravel", tmp_path / "all.pt"))
    [normal] = score_store(store, [(model.build_projector(), model.center)], params.score, split="train")
    assert model.normal_scores == pytest.approx(normal.tolist()) and model.threshold.rule == "quantile"
    with pytest.raises(FileNotFoundError, match="run the train stage"):
        export_variant(params, 8.0, "ones", "mine", "gravel", tmp_path / "x.pt")
    with pytest.raises(ModelError, match="no Protocol B models"):
        export_variant(params, 1.0, "ones", "digits", "0", tmp_path / "x.pt")


def test_mismatched_backbone_or_geometry_fails_clearly(model_path: Path, tmp_path: Path) -> None:
    model = load_artefact(model_path)
    other = {**model.backbone, "name": "resnet18", "layers": [1, 2]}
    with pytest.raises(ModelError, match=r"backbone.name: model 'tf_efficientnet_lite0', store 'resnet18'"):
        model.check_features(other, model.geometry, "store")
    with pytest.raises(ModelError, match=r"geometry.crop: model 64, store 224"):
        model.check_features(model.backbone, {"resize": 256, "crop": 224}, "store")
    model.check_features({**model.backbone, "layers": (1, 2, 3)}, model.geometry, "store")  # same values pass

    # Scoring through an extractor built differently from the model's backbone is refused by name.
    from polarocc.models.backbone import build_extractor

    two_levels = build_extractor("tf_efficientnet_lite0", (1, 2), pool=3, weights="package")
    with pytest.raises(ModelError, match=r"backbone.layers: model \[1, 2, 3\], the given extractor \[1, 2\]"):
        Detector.from_artefact(model, extractor=two_levels)

    # A model whose recorded geometry disagrees with what its backbone produces is refused when loaded to score.
    wrong = replace(model, geometry={"resize": 256, "crop": 224})
    with pytest.raises(ModelError, match=r"produces features of shape \(176, 56, 56\).*expects \(176, 16, 16\)"):
        Detector.from_artefact(wrong).extractor  # noqa: B018 (the backbone is built and checked on first use)
    tampered = replace(model, feature_shape=(24, 16, 16))
    save_artefact(tmp_path / "bad.pt", tampered)
    with pytest.raises(ModelError, match="inconsistent"):
        load_artefact(tmp_path / "bad.pt")
    torch.save({"projector": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ModelError, match="not a polarocc model"):
        load_artefact(tmp_path / "checkpoint.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="cannot read"):
        load_artefact(tmp_path / "junk.pt")
    with pytest.raises(ModelError, match="no saved model"):
        load_artefact(tmp_path / "missing.pt")


def test_threshold_rules(model_path: Path) -> None:
    model = load_artefact(model_path)
    assert choose_threshold(model) == model.threshold
    assert choose_threshold(model, value=3.5).value == 3.5 and choose_threshold(model, value=3.5).rule == "user"
    median = choose_threshold(model, quantile=0.5)
    assert median.value in model.normal_scores and median.value <= model.threshold.value
    assert choose_threshold(model, radius=True).value == pytest.approx(1e-10)  # R^2 on squared maps
    assert min(model.normal_scores) > choose_threshold(model, radius=True).value  # why it is unusable
    with pytest.raises(ConfigError, match="at most one"):
        choose_threshold(model, value=1.0, quantile=0.5)
    with pytest.raises(ConfigError, match=r"\(0, 1\]"):
        choose_threshold(model, quantile=1.5)


def test_collect_images(mvtec_tree: Path, tmp_path: Path) -> None:
    folder = sorted((mvtec_tree / "brick/test").rglob("*.png"))
    assert collect_images([str(mvtec_tree / "brick/test")]) == folder
    globbed = collect_images([str(mvtec_tree / "brick/test/*/000.png")])
    assert [p.parent.name for p in globbed] == sorted(p.parent.name for p in globbed) and len(globbed) >= 2
    listing = tmp_path / "list.txt"
    listing.write_text(f"# stream order\n{folder[2]}\n{folder[0]}\n\n{folder[2]}\n")
    assert collect_images([], listing) == [folder[2], folder[0]]  # order kept, repeats dropped
    names = output_names(folder)
    assert len(set(names)) == len(names) and "good__000" in names  # same file name in two folders stays apart
    with pytest.raises(DataError, match=r"missing\.png is not an image file"):
        collect_images([str(tmp_path / "missing.png")])
    with pytest.raises(DataError, match="matches no images"):
        collect_images([str(tmp_path / "*.png")])
    with pytest.raises(DataError, match="no input images"):
        collect_images([])


def test_predict_writes_scores_maps_and_overlays(model_path: Path, mvtec_tree: Path, tmp_path: Path, lite0) -> None:
    model = load_artefact(model_path)
    detector = Detector.from_artefact(model, extractor=lite0)
    images = _test_images(mvtec_tree)
    threshold = choose_threshold(model, quantile=0.5)
    table = predict(detector, images, tmp_path / "out", threshold, batch_size=3, progress=False)
    assert table["path"].to_list() == [str(p) for p in images]
    _, direct = detector.score_inputs(np.stack([load_image(p, detector.geometry) for p in images]))
    np.testing.assert_allclose(table["score"].to_numpy(), direct, rtol=1e-5)
    assert table["anomalous"].to_list() == (direct > threshold.value).tolist()
    first = tmp_path / "out" / table["map"][0]
    assert np.load(first).shape == (64, 64)
    overlay = tmp_path / "out" / table["overlay"][0]
    from PIL import Image

    width, height = Image.open(overlay).size
    assert width > 3 * 64 and height > 64  # image | heat map and colour bar | prediction, titled (no mask)


def test_predict_stops_on_a_bad_image_before_scoring(model_path: Path, mvtec_tree: Path, tmp_path: Path,
                                                     lite0) -> None:
    images = _test_images(mvtec_tree)
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:100])
    detector = Detector.from_artefact(load_artefact(model_path), extractor=lite0)
    with pytest.raises(DataError, match=r"broken\.png"):
        predict(detector, [*images, broken], tmp_path / "out", choose_threshold(detector.artefact), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def cold(trained: Path, lite0):
    return cold_start_artefact(load_params(trained / "params.yaml"), lite0)


def _rows(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_clean_stream_follows_the_batch_one_trainer(cold, mvtec_tree: Path, tmp_path: Path, lite0) -> None:
    train_images = sorted((mvtec_tree / "brick/train/good").glob("*.png"))
    [order] = list(epoch_batches(len(train_images), 1, 1, seed=3))
    stream = [train_images[int(b[0])] for b in order]
    learner = OnlineLearner(cold, StreamSettings(clean=True), extractor=lite0)
    run_stream(learner, stream, tmp_path / "s.csv", tmp_path / "s.pt", "cold", progress=False)

    # The same pass by Protocol C's direct trainer over the same features, in the same order.
    cold_detector = Detector.from_artefact(cold, extractor=lite0)
    features = np.concatenate([cold_detector.features(load_image(p, Geometry(72, 64))[None]).numpy()
                               for p in train_images])
    reference = cold.build_projector(torch.float64)
    train_direct(reference, cold.center, lambda idx: features[idx], len(features), _train_cfg(cold, seed=3))
    torch.testing.assert_close(learner.projector.weight, reference.weight, rtol=0, atol=1e-12)
    rows = _rows(tmp_path / "s.csv")
    assert [r["path"] for r in rows] == [str(p) for p in stream] and rows[-1]["updates"] == str(len(stream))
    assert all(r["learned"] == "True" for r in rows)


def _train_cfg(artefact, seed: int):
    from polarocc.config import TrainConfig

    t = artefact.train
    return TrainConfig(epochs=1, batch_size=1, lr=t["lr"], weight_decay=t["weight_decay"], radius=t["radius"],
                       seed=seed)


def test_stream_learns_only_from_images_it_judges_normal(model_path: Path, mvtec_tree: Path, tmp_path: Path,
                                                        lite0) -> None:
    model = load_artefact(model_path)
    images = _test_images(mvtec_tree)
    crops = np.stack([load_image(p, Geometry(72, 64)) for p in images])
    _, before = Detector.from_artefact(model, extractor=lite0).score_inputs(crops)
    learner = OnlineLearner(model, StreamSettings(threshold=float(np.median(before))), extractor=lite0)
    start = learner.projector.weight.detach().clone()
    run_stream(learner, images, tmp_path / "s.csv", tmp_path / "s.pt", "m", progress=False)
    rows = _rows(tmp_path / "s.csv")
    decisions = {r["decision"] for r in rows}
    assert decisions == {"normal", "anomalous"}
    for row in rows:
        assert (row["learned"] == "True") == (row["decision"] == "normal")
        assert (row["decision"] == "anomalous") == (float(row["score"]) > float(row["threshold"]))
    assert learner.updates == sum(r["decision"] == "normal" for r in rows)
    assert not torch.equal(start, learner.projector.weight)


def test_adaptive_threshold_follows_recent_normal_scores(cold, mvtec_tree: Path, tmp_path: Path, lite0) -> None:
    images = sorted((mvtec_tree / "brick/train/good").glob("*.png")) + _test_images(mvtec_tree)
    settings = StreamSettings(quantile=1.0, window=3, warmup=4)
    settings.validate(has_model_threshold=False)
    learner = OnlineLearner(cold, settings, extractor=lite0)
    run_stream(learner, images, tmp_path / "s.csv", tmp_path / "s.pt", "cold", progress=False)
    rows = _rows(tmp_path / "s.csv")
    assert [r["decision"] for r in rows[:4]] == ["warmup"] * 4
    learned = [float(r["score"]) for r in rows if r["learned"] == "True"]
    for i, row in enumerate(rows[4:], start=4):
        earlier = [float(r["score"]) for r in rows[:i] if r["learned"] == "True"]
        assert float(row["threshold"]) == pytest.approx(max(earlier[-3:]), rel=1e-5)
    assert len(learned) == learner.updates


def test_stream_resumes_after_a_crash_without_losing_or_repeating_updates(cold, mvtec_tree: Path,
                                                                          tmp_path: Path, lite0) -> None:
    images = sorted((mvtec_tree / "brick/train/good").glob("*.png")) + _test_images(mvtec_tree)
    settings = StreamSettings(clean=True, save_every=2)
    whole = OnlineLearner(cold, settings, extractor=lite0)
    run_stream(whole, images, tmp_path / "whole.csv", tmp_path / "whole.pt", "cold", progress=False)

    class Crash(Exception):
        pass

    def crash_at(index: int):
        def on_image(i: int) -> None:
            if i == index:
                raise Crash
        return on_image

    csv_path, state = tmp_path / "s.csv", tmp_path / "s.pt"
    with pytest.raises(Crash):  # dies after image 4's row; the last state was saved after image 3
        run_stream(OnlineLearner(cold, settings, extractor=lite0), images, csv_path, state, "cold", progress=False,
                   on_image=crash_at(4))
    assert len(_rows(csv_path)) == 5
    with pytest.raises(Crash):
        run_stream(OnlineLearner(cold, settings, extractor=lite0), images, csv_path, state, "cold", progress=False,
                   on_image=crash_at(9))
    resumed = OnlineLearner(cold, settings, extractor=lite0)
    counts = run_stream(resumed, images, csv_path, state, "cold", progress=False)
    assert counts["total"] == len(images) and resumed.updates == len(images)
    assert _rows(csv_path) == _rows(tmp_path / "whole.csv")
    torch.testing.assert_close(resumed.projector.weight, whole.projector.weight, rtol=0, atol=1e-12)

    # Resuming over a different stream, or with other settings, is refused.
    with pytest.raises(DataError, match="differ from the ones already processed"):
        run_stream(OnlineLearner(cold, settings, extractor=lite0), images[::-1], csv_path, state, "cold",
                   progress=False)
    with pytest.raises(ConfigError, match="settings differs"):
        run_stream(OnlineLearner(cold, StreamSettings(clean=True), extractor=lite0), images, csv_path, state, "cold",
                   progress=False)
    state.unlink()
    with pytest.raises(DataError, match="no state file"):
        run_stream(OnlineLearner(cold, settings, extractor=lite0), images, csv_path, state, "cold", progress=False)


def test_stream_settings_need_a_way_to_decide() -> None:
    with pytest.raises(ConfigError, match="cannot tell normal from anomalous"):
        StreamSettings().validate(has_model_threshold=False)
    with pytest.raises(ConfigError, match="not both"):
        StreamSettings(threshold=1.0, quantile=0.9).validate(has_model_threshold=True)
    StreamSettings(clean=True).validate(has_model_threshold=False)
    StreamSettings(quantile=0.9, warmup=8).validate(has_model_threshold=False)


def test_cli_export_predict_and_stream(trained: Path, model_path: Path, mvtec_tree: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polarocc.cli import app

    runner = CliRunner()
    params = str(trained / "params.yaml")
    exported = runner.invoke(app, ["export", "gravel", str(tmp_path / "g.pt"), "--params", params])
    assert exported.exit_code == 0, exported.output
    assert load_artefact(tmp_path / "g.pt").provenance["distribution"] == "normal"

    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(model_path), str(mvtec_tree / "brick/test"), "-o", str(out),
                                 "--threshold", "1000", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pl.read_csv(out / "scores.csv")
    assert "threshold 1000 (user)" in result.output
    assert f"{int(table['anomalous'].sum())} of {table.height} images anomalous" in result.output
    assert len(list((out / "overlays").glob("*.png"))) == table.height == len(list((out / "maps").glob("*.npy")))
    radius = runner.invoke(app, ["predict", str(model_path), str(mvtec_tree / "brick/test/good"), "-o",
                                 str(tmp_path / "r"), "--radius-threshold", "--no-maps"])
    assert radius.exit_code == 0 and "(radius)" in radius.output and not (tmp_path / "r/maps").exists()
    assert pl.read_csv(tmp_path / "r/scores.csv")["anomalous"].all()  # d > R flags every image
    bad = runner.invoke(app, ["predict", str(tmp_path / "nope.pt"), str(mvtec_tree)])
    assert bad.exit_code == 2 and "no saved model" in bad.output

    stream_args = ["stream", str(mvtec_tree / "brick/train/good"), "--model", str(model_path), "--csv",
                   str(tmp_path / "s.csv"), "--state", str(tmp_path / "s.pt"), "--device", "cpu"]
    first = runner.invoke(app, [*stream_args, "--save-model", str(tmp_path / "streamed.pt")])
    assert first.exit_code == 0, first.output
    assert "processed 6 image(s) now, 6 in all" in first.output
    reordered = runner.invoke(app, [*stream_args[:1], str(mvtec_tree / "brick/test/good"), *stream_args[1:]])
    assert reordered.exit_code == 2 and "differ from the ones already processed" in reordered.output
    grown = runner.invoke(app, [*stream_args, str(mvtec_tree / "brick/test/good")])
    assert grown.exit_code == 0 and "processed 3 image(s) now, 9 in all" in grown.output, grown.output
    assert load_artefact(tmp_path / "streamed.pt").provenance["stream_images"] == 6
    neither = runner.invoke(app, ["stream", str(mvtec_tree)])
    assert neither.exit_code == 2 and "--model FILE or --cold-start" in neither.output


@pytest.mark.integration
def test_stream_killed_with_sigkill_resumes_to_the_same_rows(model_path: Path, mvtec_tree: Path,
                                                             tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    images = [*sorted((mvtec_tree / "brick/train/good").glob("*.png")), *_test_images(mvtec_tree)]
    listing = tmp_path / "stream.txt"
    listing.write_text("\n".join(str(p) for p in images) + "\n")

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "polarocc.cli", "stream", "--list", str(listing), "--model", str(model_path),
                "--clean", "--device", "cpu", "--csv", str(tmp_path / f"{name}.csv"), "--state",
                str(tmp_path / f"{name}.pt")]

    whole = subprocess.run(command("whole"), capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr[-2000:]

    victim = subprocess.Popen(command("killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = tmp_path / "killed.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not rows.is_file() or len(rows.read_text().splitlines()) < 5):
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    written = len(rows.read_text().splitlines()) - 1
    assert 4 <= written < len(images), "the kill should land mid-stream"
    resumed = subprocess.run(command("killed"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"{len(images)} in all; {len(images)} updates" in resumed.stdout
    assert _rows(rows) == _rows(tmp_path / "whole.csv")
