"""Integration: the real DVC pipeline on a tiny generated dataset, then an incremental norm sweep."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from polarocc.reports.tables import read_results
from tests.conftest import ROOT, write_params

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.mark.slow
def test_dvc_repro_then_new_norm(params_dict: dict, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "dvc.yaml", project)
    for folder in ("stages", "polarocc"):
        shutil.copytree(ROOT / folder, project / folder, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(params_dict, project)
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)

    first = _stages_run(_run(["dvc", "repro"], project))
    assert {"prepare", "extract@textures", "extract_a@digits", "train@1", "train@8", "score@1", "score@8",
            "online@textures", "export", "aggregate"} <= first

    table = read_results(project / "reports/results.csv")
    online = table.filter(pl.col("protocol") == "C")
    assert online["category"].to_list() == ["brick", "gravel"] and (online["batch_size"] == 1).all()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["textures"]["online_image_auroc"] == pytest.approx(online["image_auroc"].mean(), abs=1e-4)
    assert (project / "reports/plots/learning_curve_textures.png").is_file()
    assert (project / "models/deploy/textures/brick.pt").is_file()
    assert (project / "models/online/textures/gravel.pt").is_file()
    plots = _run(["dvc", "plots", "show", "--json"], project)
    assert "reports/learning_curves/textures.csv" in plots
    table = table.filter(pl.col("protocol") != "C")
    assert table.height == (2 + 2) * 2 * 2  # (categories + digit classes) x distributions x norms
    digits = table.filter(pl.col("protocol") == "A")
    assert set(digits["dataset"]) == {"digits"} and set(digits["category"]) == {"0", "7"}
    assert digits["pixel_auroc"].null_count() == digits.height
    table = table.filter(pl.col("protocol") == "B")
    assert table["image_auroc"].is_between(0, 1).all() and table["pixel_auroc"].is_between(0, 1).all()
    headline = table.filter((pl.col("distribution") == "normal") & (pl.col("norm") == 1.0))
    assert metrics["textures"]["image_auroc"] == pytest.approx(headline["image_auroc"].mean(), abs=1e-4)
    digits_headline = digits.filter((pl.col("distribution") == "normal") & (pl.col("norm") == 1.0))
    assert metrics["digits"]["image_auroc"] == pytest.approx(digits_headline["image_auroc"].mean(), abs=1e-4)
    assert "pixel_auroc" not in metrics["digits"]
    assert (project / "reports/plots/norm_sweep.png").stat().st_size > 10_000
    model = project / "models/norm-8/ones/textures/brick.pt"
    assert model.is_file()

    # A new norm reruns only its own train/score stages and the aggregate; extraction is untouched.
    params_dict["sweep"]["norms"] = [1, 3]
    write_params(params_dict, project)
    second = _stages_run(_run(["dvc", "repro"], project))
    assert second == {"train@3", "score@3", "aggregate"}
    table = read_results(project / "reports/results.csv").filter(pl.col("protocol") != "C")
    assert sorted(set(table["norm"])) == [1.0, 3.0]
    assert table.height == (2 + 2) * 2 * 2  # the dropped norm 8 leaves no stale rows
