"""Data safety: nothing polarocc did not create is deleted or overwritten, no code runs from files, and user
errors are one line naming the key or file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zarr

from polarocc.atomic import atomic_file, write_text
from polarocc.config import load_params
from polarocc.detector.model_files import load_model
from polarocc.errors import DataError, MissingOutputError, ModelError, PolaroccError, UnsafePathError
from polarocc.features import store as fs
from polarocc.ownership import MARKER, claim, inside, replace_folder, safe_name
from polarocc.pipeline.check import run_check
from polarocc.pipeline.prepare import run_prepare
from tests.conftest import ROOT, write_params


class _WritesAFile:
    """A pickle payload that would create ``path`` if anything unpickled it unsafely."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    return victim


@pytest.mark.parametrize("output", ["../victim", "{victim}"])
def test_prepare_refuses_an_output_outside_the_project(params_dict: dict, tmp_path: Path, output: str) -> None:
    victim = _victim(tmp_path)
    project = tmp_path / "proj"
    project.mkdir()
    params_dict["embedded_data"]["output"] = output.format(victim=victim)
    params_dict["datasets"]["textures"]["path"] = output.format(victim=victim)
    params = load_params(write_params(params_dict, project))
    with pytest.raises(UnsafePathError, match=r"embedded_data\.output.*outside"):
        run_prepare(params)
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_prepare_refuses_a_folder_it_did_not_create_and_replaces_its_own(params_dict: dict, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    mine = project / "data/textures"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    params = load_params(write_params(params_dict, project))
    with pytest.raises(UnsafePathError, match=r"embedded_data\.output.*did not create"):
        run_prepare(params)
    assert (mine / "notes.txt").read_text() == "mine"
    (mine / "notes.txt").unlink()  # an empty folder may be taken
    run_prepare(params)
    assert (mine / MARKER).is_file() and (mine / "brick/train/good").is_dir()
    run_prepare(params)  # its own folder is replaced as a whole
    assert not list(project.glob("data/.textures.*"))
    (mine / "brick/my_notes.txt").write_text("added by the user")  # not polarocc's: the folder is no longer replaced
    with pytest.raises(UnsafePathError, match=r"embedded_data\.output: .*holds brick/my_notes\.txt"):
        run_prepare(params)
    assert (mine / "brick/my_notes.txt").read_text() == "added by the user"


def test_prepare_accepts_the_folder_dvc_lock_records(params_dict: dict, tmp_path: Path) -> None:
    project = tmp_path / "proj"
    (project / "data/textures/brick").mkdir(parents=True)  # written by an older polarocc, without a marker
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/textures\n")
    run_prepare(load_params(write_params(params_dict, project)))
    assert (project / "data/textures" / MARKER).is_file()


def test_replace_folder_keeps_the_old_content_when_building_fails(tmp_path: Path) -> None:
    out = tmp_path / "out"
    replace_folder(out, "--out", "predict", lambda staging: (staging / "scores.csv").write_text("old"))

    def build(staging: Path) -> None:
        (staging / "scores.csv").write_text("half")
        raise DataError("bad image")

    with pytest.raises(DataError):
        replace_folder(out, "--out", "predict", build)
    assert (out / "scores.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind


def test_only_the_step_that_wrote_a_folder_may_replace_it_and_only_with_nothing_else_inside(tmp_path: Path) -> None:
    def write(staging: Path) -> None:
        (staging / "maps").mkdir()
        (staging / "maps/a.npy").write_bytes(b"map")

    replace_folder(tmp_path / "out", "--out", "predict", write)
    with pytest.raises(UnsafePathError, match=r"--out: .*holds the output of polarocc predict, not of prepare"):
        replace_folder(tmp_path / "out", "--out", "prepare", write)
    (tmp_path / "out/maps/annotation.txt").write_text("mine")
    with pytest.raises(UnsafePathError, match=r"holds maps/annotation\.txt, which polarocc did not write"):
        replace_folder(tmp_path / "out", "--out", "predict", write)
    assert (tmp_path / "out/maps/annotation.txt").read_text() == "mine"
    claim(tmp_path / "visa", "OUT", "convert-visa")
    with pytest.raises(UnsafePathError, match=r"OUT: .*polarocc convert-visa, not of predict"):
        claim(tmp_path / "visa", "OUT", "predict")


def test_a_killed_runs_staging_folder_is_removed_by_the_next_run(tmp_path: Path) -> None:
    from polarocc.ownership import write_marker

    dead = 2**22 + 12345  # above Linux's default pid_max: no such process
    for leftover in (tmp_path / f".out.partial-{dead}", tmp_path / f".out.old-{dead}"):
        leftover.mkdir()
        write_marker(leftover, "predict", [])
    mine = tmp_path / f".out.partial-{dead + 1}"
    mine.mkdir()  # not marked: not polarocc's, kept
    replace_folder(tmp_path / "out", "--out", "predict", lambda staging: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [mine.name, "out"]


def test_names_and_paths_stay_inside(tmp_path: Path) -> None:
    for name in ("../x", "a/b", "..", ".", "", "/etc"):
        with pytest.raises(UnsafePathError, match="key"):
            safe_name(name, "key")
    assert safe_name("T-shirt top_1.v2", "key") == "T-shirt top_1.v2"
    with pytest.raises(UnsafePathError, match=r"row 3.*outside"):
        inside(tmp_path, tmp_path / "a/../../b", "row 3")
    assert inside(tmp_path, tmp_path / "a/./b", "k") == (tmp_path / "a/b").resolve()


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path: Path) -> None:
    target = write_text(tmp_path / "report.md", "complete")
    with pytest.raises(RuntimeError), atomic_file(target) as fh:
        fh.write(b"half a rep")
        raise RuntimeError("killed")
    assert target.read_text() == "complete" and [p.name for p in tmp_path.iterdir()] == ["report.md"]


def _tiny_store(path: Path, value: float) -> Path:
    layout = fs.StoreLayout(2, 1, 1, 1, "float32", 1, "none", 0, image_level=True)
    group = fs.create_or_resume(path, f"fp{value}", layout, {}, {})
    group.attrs["value"] = value
    return path


def test_finalize_moves_the_old_store_aside_until_the_new_one_is_in_place(tmp_path: Path, monkeypatch) -> None:
    final, partial = tmp_path / "features/cat.zarr", tmp_path / ".partial/cat.zarr"
    fs.finalize(_tiny_store(partial, 1.0), final)
    _tiny_store(partial, 2.0)
    real_replace, moves = os.replace, []

    def replace(src, dst):
        moves.append((Path(src).name, Path(dst).name))
        if Path(src) == partial:
            assert not final.exists() and (tmp_path / ".partial/cat.zarr.previous").is_dir()  # old one kept aside
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    fs.finalize(partial, final)
    assert zarr.open_group(final, mode="r").attrs["value"] == 2.0
    store_moves = [m for m in moves if m[0].startswith("cat.zarr")]  # zarr renames its own files too
    assert store_moves == [("cat.zarr", "cat.zarr.previous"), ("cat.zarr", "cat.zarr")]
    assert not (tmp_path / ".partial/cat.zarr.previous").exists()


def test_a_partial_store_path_holding_something_else_is_never_deleted(tmp_path: Path) -> None:
    partial = tmp_path / ".partial/cat.zarr"
    partial.mkdir(parents=True)
    (partial / "photo.jpg").write_bytes(b"not a store")
    layout = fs.StoreLayout(2, 1, 1, 1, "float32", 1, "none", 0, image_level=True)
    with pytest.raises(UnsafePathError, match="not a zarr feature store"):
        fs.create_or_resume(partial, "fp", layout, {}, {})
    assert (partial / "photo.jpg").read_bytes() == b"not a store"


def test_a_damaged_partial_store_is_rebuilt(tmp_path: Path) -> None:
    partial = tmp_path / ".partial/cat.zarr"
    partial.mkdir(parents=True)
    (partial / "zarr.json").write_text("{ truncated")
    layout = fs.StoreLayout(2, 1, 1, 1, "float32", 1, "none", 0, image_level=True)
    group = fs.create_or_resume(partial, "fp", layout, {}, {})
    assert group.attrs["fingerprint"] == "fp"


def test_a_trained_model_file_never_runs_code(tmp_path: Path) -> None:
    touched = tmp_path / "pwned"
    model = tmp_path / "brick.pt"
    torch.save({"projector": _WritesAFile(touched), "center": torch.ones(3)}, model)
    with pytest.raises(ModelError) as caught:
        load_model(model)
    message = str(caught.value)
    assert str(model) in message and "posix.system" in message and "weights_only" not in message
    assert not touched.exists()
    with pytest.raises(MissingOutputError, match="dvc repro train"):
        load_model(tmp_path / "missing.pt")
    torch.save({"center": torch.ones(3)}, model)
    with pytest.raises(ModelError, match="not a trained projector"):
        load_model(model)


def test_check_rejects_a_category_without_normal_test_images(params_dict: dict, mvtec_tree: Path,
                                                             tmp_path: Path) -> None:
    data = tmp_path / "mine"
    shutil.copytree(mvtec_tree, data)
    shutil.rmtree(data / "gravel/test/good")
    params_dict["datasets"] = {"mine": {"format": "mvtec", "path": str(data), "categories": ["brick", "gravel"]}}
    params_dict["protocol_c"]["datasets"] = ["mine"]
    params = load_params(write_params(params_dict, tmp_path))
    with pytest.raises(DataError, match=r"datasets\.mine category gravel.*no normal \(test/good\) test images"):
        run_check(params, "mine", progress=False)


def test_errors_are_one_line() -> None:
    assert str(PolaroccError("cannot read x:\n  line 2\tand 3")) == "cannot read x: line 2 and 3"


def _stage(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages" / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True)


@pytest.mark.integration
def test_stages_print_one_line_naming_the_problem(params_dict: dict, tmp_path: Path) -> None:
    write_params(params_dict, tmp_path)
    for args, expected in ((["score.py", "1"], "no feature store at"), (["validate.py"], None),
                           (["train.py", "nan"], "params key 'norm'")):
        result = _stage(args, tmp_path)
        if expected is None:
            assert result.returncode == 0, result.stderr
            continue
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert expected in line
    (tmp_path / "params.yaml").write_text("center: {norm: [1\n")
    result = _stage(["validate.py"], tmp_path)
    assert result.returncode == 2 and "not valid YAML" in result.stderr and "Traceback" not in result.stderr


def test_validate_names_layers_weights_and_devices(params_dict: dict, tmp_path: Path) -> None:
    from polarocc.pipeline.validate import validate_environment

    for section, key, value, expected in (("backbone", "layers", [1, 2, 9], "backbone.layers"),
                                          ("backbone", "weights", str(tmp_path / "nowhere.pth"), "backbone.weights"),
                                          ("backbone", "name", "tf_efficientnet_lite9", "backbone.name")):
        raw = {**params_dict, section: {**params_dict[section], key: value}}
        with pytest.raises(PolaroccError, match=expected):
            validate_environment(load_params(write_params(raw, tmp_path)))
    validate_environment(load_params(write_params(params_dict, tmp_path)))
    if not torch.cuda.is_available():
        raw = {**params_dict, "score": {**params_dict["score"], "device": "cuda"}}
        with pytest.raises(PolaroccError, match=r"score\.device"):
            validate_environment(load_params(write_params(raw, tmp_path)))




def test_predict_output_paths_that_cannot_be_folders_are_one_line_errors(tmp_path: Path, monkeypatch) -> None:
    from polarocc.data.inputs import collect_images

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UnsafePathError, match=r"--out: cannot create the folder"):
        replace_folder(tmp_path / "a_file/sub", "--out", "predict", lambda staging: None)
    monkeypatch.chdir(tmp_path)
    for here in (".", str(tmp_path.parent)):
        with pytest.raises(UnsafePathError, match=r"--out: .*current folder"):
            replace_folder(Path(here), "--out", "predict", lambda staging: None)
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe bad bytes")
    with pytest.raises(DataError, match=r"list file .*list\.txt as UTF-8"):
        collect_images([], tmp_path / "list.txt")


def _reader_calls(path: Path):
    from polarocc.deploy.stream import read_state
    from polarocc.detector.artefact import load_artefact
    from polarocc.models.backbone import check_weights
    from polarocc.models.weights import read_state_dict

    return {"trained projector": lambda: load_model(path), "model file": lambda: load_artefact(path),
            "stream state": lambda: read_state(path), "weights file": lambda: read_state_dict(path),
            "weights check": lambda: check_weights("tf_efficientnet_lite0", str(path))}


@pytest.mark.parametrize("reader", ["trained projector", "model file", "stream state", "weights file",
                                    "weights check"])
def test_no_reader_runs_code_from_a_file(tmp_path: Path, reader: str) -> None:
    touched = tmp_path / "pwned"
    path = tmp_path / "file.pt"
    torch.save({"format": "polarocc-model", "projector": _WritesAFile(touched)}, path)
    with pytest.raises(PolaroccError) as caught:
        _reader_calls(path)[reader]()
    message = str(caught.value)
    assert str(path) in message and "posix.system" in message and "weights_only" not in message
    assert not touched.exists()


def test_the_malicious_payload_really_runs_code_when_loaded_unsafely(tmp_path: Path) -> None:
    touched = tmp_path / "pwned"
    torch.save({"x": _WritesAFile(touched)}, tmp_path / "file.pt")
    torch.load(tmp_path / "file.pt", weights_only=False)  # what polarocc never does
    assert touched.exists()


def test_atomic_outputs_get_the_usual_permissions(tmp_path: Path) -> None:
    from polarocc.atomic import FILE_MODE

    mask = os.umask(0o022)
    os.umask(mask)
    path = write_text(tmp_path / "report.md", "x")
    assert path.stat().st_mode & 0o777 == FILE_MODE == 0o666 & ~mask


def test_weights_with_nan_are_refused_by_name(tmp_path: Path) -> None:
    from polarocc.models.weights import converted_package_weights, read_state_dict

    state = torch.load(converted_package_weights(), weights_only=True)
    state["blocks.1.0.conv_pw.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    with pytest.raises(PolaroccError, match=r"nan\.pth holds NaN or Inf in blocks\.1\.0\.conv_pw\.weight"):
        read_state_dict(tmp_path / "nan.pth")


def test_an_unreachable_scheduler_is_named_before_any_work(params_dict: dict, tmp_path: Path) -> None:
    from polarocc.pipeline.validate import validate_environment

    params_dict["extract"]["scheduler"] = "tcp://127.0.0.1:1"
    with pytest.raises(PolaroccError, match=r"extract\.scheduler: no dask scheduler answers at tcp://127\.0\.0\.1:1"):
        validate_environment(load_params(write_params(params_dict, tmp_path)))
