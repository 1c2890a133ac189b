"""The check stage stops on a bad file before extraction, naming the file."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_params

pytestmark = pytest.mark.integration


def _project(params_dict: dict, mvtec_tree: Path, tmp_path: Path) -> Path:
    data = tmp_path / "mine"
    shutil.copytree(mvtec_tree, data)
    params_dict["datasets"] = {"mine": {"format": "mvtec", "path": str(data), "categories": ["brick", "gravel"]}}
    params_dict["protocol_c"]["datasets"] = ["mine"]
    write_params(params_dict, tmp_path)
    return data


def _check(tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "stages/check.py"), "mine"], cwd=tmp_path,
                          capture_output=True, text=True)


def test_check_reports_counts(params_dict: dict, mvtec_tree: Path, tmp_path: Path) -> None:
    _project(params_dict, mvtec_tree, tmp_path)
    result = _check(tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "reports/checks/mine.json").read_text())
    assert summary["brick"] == {"train": 6, "test": 7, "test_anomalous": 4, "warnings": []}


def test_truncated_image_stops_before_extraction(params_dict: dict, mvtec_tree: Path, tmp_path: Path) -> None:
    data = _project(params_dict, mvtec_tree, tmp_path)
    earlier = tmp_path / "data/features/mine/brick.zarr"
    earlier.mkdir(parents=True)
    (earlier / "zarr.json").write_text("{}")
    victim = data / "gravel/test/good/001.png"
    victim.write_bytes(victim.read_bytes()[:150])
    result = _check(tmp_path)
    assert result.returncode == 2
    assert "gravel/test/good/001.png" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "reports/checks/mine.json").exists()
    assert (earlier / "zarr.json").read_text() == "{}"  # earlier outputs are untouched
