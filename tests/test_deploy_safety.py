"""Deploy commands never trust a file blindly nor destroy what they did not write: model and state files are
validated, outputs are replaced only when polarocc's own, and saved thresholds describe where they came from."""

from __future__ import annotations

import hashlib
import math
import pathlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from polarocc.deploy.predict import choose_threshold, predict
from polarocc.deploy.stream import (
    HEADER,
    InputsDigest,
    OnlineLearner,
    StreamSettings,
    run_stream,
    save_stream_model,
)
from polarocc.detector.artefact import FORMAT_VERSION, load_artefact, save_artefact
from polarocc.detector.detector import Detector
from polarocc.errors import DataError, ModelError, UnsafePathError
from polarocc.ownership import MARKER
from tests.test_deploy import _rows, _test_images, cold, model_path, trained  # noqa: F401  (shared fixtures)


def _payload(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _train_images(mvtec_tree: Path) -> list[Path]:
    return sorted((mvtec_tree / "brick/train/good").glob("*.png"))


# --- load_artefact / save_artefact ------------------------------------------------------------------------------


def _load_changed(model: Path, tmp_path: Path, change) -> tuple[Path, str]:
    """Save ``model``'s payload after ``change`` and load it: (the file, the one-line ModelError it gives)."""
    payload = _payload(model)
    change(payload)
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(ModelError) as caught:
        load_artefact(broken)
    return broken, _one_line(caught)


@pytest.mark.parametrize(("change", "named"), [
    (lambda p: p.pop("format_version"), "'format_version' is missing"),
    (lambda p: p.pop("center"), "'center' is missing"),
    (lambda p: p.pop("normal_scores"), "'normal_scores' is missing"),
    (lambda p: p["projector"].pop("weight"), "'projector.weight' is missing"),
    (lambda p: p["projector"].update(weight=[[1.0]]), "'projector.weight' is a list"),
    (lambda p: p.update(format_version="1"), "'format_version' is a str"),
    (lambda p: p.update(feature_shape=[176, 16]), "'feature_shape' is a list"),
    (lambda p: p["geometry"].pop("crop"), "'geometry.crop' is missing"),
    (lambda p: p.update(threshold={"rule": "quantile"}), "'threshold.value' is missing"),
    (lambda p: p.update(threshold=0.5), "'threshold' is a float"),
    (lambda p: p.update(normal_scores=["a"]), "'normal_scores' is a list, not a list of numbers"),
    (lambda p: p.update(versions=None), "'versions' is a NoneType"),
])
def test_model_file_with_missing_or_mistyped_keys_fails_by_name(model_path: Path, tmp_path: Path,  # noqa: F811
                                                                 change, named: str) -> None:
    broken, text = _load_changed(model_path, tmp_path, change)
    assert str(broken) in text and named in text and "re-export it with `polarocc export`" in text


@pytest.mark.parametrize(("change", "part"), [
    (lambda p: p["center"].__setitem__(0, math.nan), "center"),
    (lambda p: p["projector"]["weight"].__setitem__((0, 0), math.inf), "projector weight"),
    (lambda p: p["threshold"].update(value=math.nan), "threshold value"),
    (lambda p: p["normal_scores"].__setitem__(2, math.nan), "normal scores"),
])
def test_model_file_with_nan_or_inf_fails_by_name(model_path: Path, tmp_path: Path, change,  # noqa: F811
                                                  part: str) -> None:
    broken, text = _load_changed(model_path, tmp_path, change)
    assert str(broken) in text and part in text and "NaN or Inf" in text and "retrain or re-export" in text


def test_save_artefact_overwrites_only_polarocc_model_files(model_path: Path, tmp_path: Path) -> None:  # noqa: F811
    model = load_artefact(model_path)
    mine = tmp_path / "notes.pt"
    mine.write_text("my own notes")
    with pytest.raises(UnsafePathError, match=r"notes\.pt exists and is a file that is not a polarocc model"):
        save_artefact(mine, model)
    assert mine.read_text() == "my own notes"
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"projector": {}}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(UnsafePathError, match="never overwrites"):
        save_artefact(checkpoint, model)
    assert checkpoint.read_bytes() == before
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(UnsafePathError, match="is a folder"):
        save_artefact(tmp_path / "folder.pt", model)

    # A polarocc model file, even one that no longer loads (NaN), may be replaced: that is how it is fixed.
    ours = save_artefact(tmp_path / "ours.pt", model)
    payload = _payload(ours)
    payload["center"][0] = math.nan
    torch.save(payload, ours)
    save_artefact(ours, model)
    assert torch.equal(load_artefact(ours).center, model.center)


def digest(paths: list[Path]) -> str:
    """The definition of a stream's inputs digest (what state files record), computed the slow way."""
    return hashlib.sha256("\n".join(str(p.resolve()) for p in paths).encode()).hexdigest()


# --- stream state files, --restart and the inputs digest ----------------------------------------------------------


def _stream(cold, lite0, images: list[Path], folder: Path, restart: bool = False, **settings: Any):  # noqa: F811
    learner = OnlineLearner(cold, StreamSettings(clean=True, **settings), extractor=lite0)
    run_stream(learner, images, folder / "s.csv", folder / "s.pt", "cold", restart=restart, progress=False)
    return learner


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "not a dict", "no learner", "mistyped"])
def test_unusable_state_file_fails_in_one_line_naming_it(cold, mvtec_tree: Path, tmp_path: Path, lite0,  # noqa: F811
                                                         damage: str) -> None:
    images = _train_images(mvtec_tree)[:3]
    _stream(cold, lite0, images, tmp_path)
    state = tmp_path / "s.pt"
    if damage == "truncated":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "empty":
        state.write_bytes(b"")
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(3)}, state)
    elif damage == "not a dict":
        torch.save([1, 2, 3], state)
    else:
        payload = _payload(state)
        if damage == "no learner":
            del payload["learner"]
        else:
            payload["learner"]["processed"] = "three"
        torch.save(payload, state)
    with pytest.raises((ModelError, DataError)) as caught:
        _stream(cold, lite0, images, tmp_path)
    text = _one_line(caught)
    assert str(state) in text and "--restart" in text and "weights_only" not in text

    state_before = state.read_bytes()
    learner = _stream(cold, lite0, images, tmp_path, restart=True)  # --restart starts over, as the error says
    assert learner.processed == 3 and len(_rows(tmp_path / "s.csv")) == 3
    if damage in ("no learner", "mistyped"):  # polarocc's own state file, damaged: replaced
        assert not (tmp_path / "s.pt.unreadable").exists()
    else:  # not recognisably polarocc's: kept, renamed aside, never deleted
        assert (tmp_path / "s.pt.unreadable").read_bytes() == state_before


def test_stream_never_deletes_or_truncates_a_foreign_csv(cold, mvtec_tree: Path, tmp_path: Path,  # noqa: F811
                                                         lite0) -> None:
    images = _train_images(mvtec_tree)[:3]
    users = tmp_path / "s.csv"
    users.write_text("name,amount\nrent,1200\nfood,400\n" * 200)
    before = users.read_bytes()
    for restart in (False, True):
        with pytest.raises(UnsafePathError, match=r"--csv: .*s\.csv is not a CSV written by polarocc stream"):
            _stream(cold, lite0, images, tmp_path, restart=restart)
        assert users.read_bytes() == before

    # A valid state next to it (from a run with another --csv) must not make a resume cut the user's file.
    other = tmp_path / "run"
    other.mkdir()
    _stream(cold, lite0, images, other)
    (other / "s.pt").replace(tmp_path / "s.pt")
    with pytest.raises(UnsafePathError, match="not a CSV written by polarocc stream"):
        _stream(cold, lite0, images, tmp_path)
    assert users.read_bytes() == before

    # --restart over polarocc's own state and CSV starts over.
    users.unlink()
    _stream(cold, lite0, images, tmp_path, restart=True)
    assert (tmp_path / "s.csv").read_text().splitlines()[0] == HEADER
    learner = _stream(cold, lite0, images[:2], tmp_path, restart=True)
    assert learner.processed == 2 and len(_rows(tmp_path / "s.csv")) == 2


def test_incremental_inputs_digest_equals_the_whole_list_digest(mvtec_tree: Path) -> None:
    images = [*_train_images(mvtec_tree), *_test_images(mvtec_tree)]
    running = InputsDigest()
    assert running.hexdigest() == digest([])
    for k, path in enumerate(images, start=1):
        running.add(path)
        assert running.hexdigest() == digest(images[:k]) and running.count == k
    assert InputsDigest(images[:4]).hexdigest() == digest(images[:4])


def test_stream_resolves_each_input_path_once_not_once_per_checkpoint(cold, mvtec_tree: Path, tmp_path: Path,  # noqa: F811
                                                                      lite0, monkeypatch: pytest.MonkeyPatch) -> None:
    images = _train_images(mvtec_tree) * 5  # 30 images, a checkpoint after each (save_every=1)
    calls = 0
    resolve = pathlib.Path.resolve

    def counting(self: Path, strict: bool = False) -> Path:
        nonlocal calls
        calls += 1
        return resolve(self, strict=strict)

    monkeypatch.setattr(pathlib.Path, "resolve", counting)
    learner = _stream(cold, lite0, images, tmp_path)
    monkeypatch.setattr(pathlib.Path, "resolve", resolve)
    n = len(images)
    assert learner.processed == n
    assert calls <= 2 * n + 10, f"{calls} path resolutions for {n} images (re-hashing every prefix: {n * (n + 1) // 2})"
    assert _payload(tmp_path / "s.pt")["inputs_digest"] == digest(images)  # the same digest as before: resumable


# --- saved stream thresholds say where they came from --------------------------------------------------------------


def test_stream_quantile_threshold_is_described_as_the_streams(cold, mvtec_tree: Path, tmp_path: Path,  # noqa: F811
                                                               lite0) -> None:
    images = _train_images(mvtec_tree)
    settings = StreamSettings(quantile=0.9, window=4, warmup=3)
    learner = OnlineLearner(cold, settings, extractor=lite0)
    run_stream(learner, images, tmp_path / "s.csv", tmp_path / "s.pt", "cold", progress=False)
    saved = load_artefact(save_stream_model(learner, tmp_path / "streamed.pt"))
    text = saved.threshold.describe()
    assert saved.threshold.rule == "stream_quantile" and saved.threshold.window == len(saved.normal_scores)
    assert "stream" in text and "training" not in text and "quantile 0.9" in text
    # Saved from the window's images scored again by the final model (the live threshold used the scores each
    # image got before its own update).
    assert saved.normal_scores == pytest.approx(learner.rescored_window())
    assert saved.normal_scores != pytest.approx(list(learner.window))
    assert saved.threshold.value == pytest.approx(float(np.quantile(saved.normal_scores, 0.9, method="higher")))
    assert saved.provenance["normal_scores"] == {"source": "stream", "stream": len(saved.normal_scores), "carried": 0}
    # A later `predict --quantile` over the saved window is not called a quantile of training scores either.
    again = choose_threshold(saved, quantile=0.5)
    assert again.rule == "stream_quantile" and "training" not in again.describe()


def test_cli_stream_from_a_model_describes_saved_thresholds_truthfully(model_path: Path,  # noqa: F811
                                                                       mvtec_tree: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from polarocc.cli import app

    model = load_artefact(model_path)
    runner = CliRunner()
    base = ["stream", str(mvtec_tree / "brick/train/good"), "--model", str(model_path), "--device", "cpu",
            "--window", "8"]

    def run(name: str, *extra: str):
        args = [*base, "--csv", str(tmp_path / f"{name}.csv"), "--state", str(tmp_path / f"{name}.pt"),
                "--save-model", str(tmp_path / f"{name}-model.pt"), *extra]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return load_artefact(tmp_path / f"{name}-model.pt")

    adaptive = run("q", "--quantile", "0.9")
    rows = _rows(tmp_path / "q.csv")
    learned = sum(r["learned"] == "True" for r in rows)
    carried = max(0, min(len(model.normal_scores), 8 - learned))
    assert adaptive.threshold.rule == "stream_quantile" and adaptive.threshold.carried == carried
    text = adaptive.threshold.describe()
    assert "stream" in text and "normal training scores" not in text
    assert ("carried over from the starting model" in text) == (carried > 0)

    fixed = run("t", "--threshold", "1000")
    assert fixed.threshold.rule == "user" and fixed.threshold.describe() == "1000 (user)"

    kept = run("m")  # the model's own threshold: its value came from training scores, and still says so
    assert kept.threshold == model.threshold and "normal training scores" in kept.threshold.describe()
    assert kept.provenance["normal_scores"]["source"] == "stream"  # but normal_scores is now the stream window
    assert len(kept.normal_scores) == 8


def test_old_model_files_without_the_new_threshold_fields_still_load(model_path: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    payload = _payload(model_path)
    assert payload["format_version"] == FORMAT_VERSION and set(payload["threshold"]) == {"value", "rule", "quantile"}
    assert "normal_scores" not in payload["provenance"]
    model = load_artefact(model_path)
    assert model.normal_scores_origin() is None and "normal training scores" in model.threshold.describe()


# --- predict replaces its output folder as a whole ----------------------------------------------------------------


@pytest.fixture
def detector(model_path: Path, lite0) -> Detector:  # noqa: F811
    return Detector.from_artefact(load_artefact(model_path), extractor=lite0)


def test_predict_failing_mid_run_leaves_the_previous_output_byte_identical(detector: Detector, mvtec_tree: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    images = _test_images(mvtec_tree)
    out = tmp_path / "out"
    threshold = choose_threshold(detector.artefact, quantile=0.5)
    predict(detector, images, out, threshold, batch_size=2, progress=False)
    before = _snapshot(out)
    assert "scores.csv" in before and any(k.startswith("maps/") for k in before) and MARKER in before

    # A broken image among the inputs stops the run before anything changes.
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:100])
    with pytest.raises(DataError, match=r"broken\.png"):
        predict(detector, [*images, broken], out, threshold, batch_size=2, progress=False)
    assert _snapshot(out) == before

    # A failure after some batches were scored (device error, file changed after the check) changes nothing.
    score, calls = detector.score_inputs, []

    def failing(pixels: np.ndarray):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return score(pixels)

    monkeypatch.setattr(detector, "score_inputs", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        predict(detector, images[::-1], out, threshold, batch_size=2, progress=False)
    assert len(calls) == 2 and _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.png", "out"]  # no staging folder left behind


def test_predict_rerun_leaves_exactly_the_new_files(detector: Detector, mvtec_tree: Path, tmp_path: Path) -> None:
    images = _test_images(mvtec_tree)
    out = tmp_path / "out"
    threshold = choose_threshold(detector.artefact)
    predict(detector, images, out, threshold, progress=False)
    table = predict(detector, images[:2], out, threshold, progress=False)
    expected = {MARKER, "scores.csv", *table["map"].to_list(), *table["overlay"].to_list()}
    assert set(_snapshot(out)) == expected and table.height == 2
    table = predict(detector, images[:2], out, threshold, write_maps=False, progress=False)
    assert set(_snapshot(out)) == {MARKER, "scores.csv"} and not (out / "maps").exists()
    assert table["map"].to_list() == [None, None]


def test_predict_refuses_a_folder_it_did_not_write_before_scoring(detector: Detector, mvtec_tree: Path,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")

    def never(pixels: np.ndarray):
        raise AssertionError("scored before the output folder was checked")

    monkeypatch.setattr(detector, "score", never)
    with pytest.raises(UnsafePathError) as caught:
        predict(detector, _test_images(mvtec_tree), out, choose_threshold(detector.artefact), progress=False)
    text = _one_line(caught)
    assert "--out" in text and str(out) in text
    assert _snapshot(out) == {"holiday.jpg": b"precious"}
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    with pytest.raises(UnsafePathError, match="is a file"):
        predict(detector, _test_images(mvtec_tree), a_file, choose_threshold(detector.artefact), progress=False)
    assert a_file.read_text() == "mine"
