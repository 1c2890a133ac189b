"""Integration: the real DVC pipeline on a tiny generated dataset, then an incremental norm sweep."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest

from polarocc.reports.tables import read_results
from tests.conftest import DVC_ENV, ROOT, make_dvc_project, run_checked, write_params

pytestmark = pytest.mark.integration



def _stagesrun_checked(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def test_dvc_repro_then_new_norm(params_dict: dict, tmp_path: Path) -> None:
    project = make_dvc_project(params_dict, tmp_path / "project")
    shutil.copytree(ROOT / ".dvc/plots", project / ".dvc/plots")

    first = _stagesrun_checked(run_checked(["dvc", "repro"], project))
    assert {"prepare", "extract@textures", "extract_a@digits", "train@1", "train@8", "score@1", "score@8",
            "online@textures", "export", "peers", "analyze", "report"} <= first

    table = read_results(project / "reports/results.csv")
    online = table.filter(pl.col("protocol") == "C")
    assert online["category"].to_list() == ["brick", "gravel"] and (online["batch_size"] == 1).all()
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["textures"]["online_image_auroc"] == pytest.approx(online["image_auroc"].mean(), abs=1e-4)
    assert (project / "reports/plots/learning_curve_textures.png").is_file()
    assert (project / "models/deploy/textures/brick.pt").is_file()
    assert (project / "models/online/textures/gravel.pt").is_file()
    plots = run_checked(["dvc", "plots", "show", "--json"], project)
    assert "reports/learning_curves/textures.csv" in plots
    peers = table.filter(pl.col("method") != "projector")
    assert peers.group_by("method").len().sort("method").rows() == [("padim", 4), ("patchcore", 4), ("untrained", 4)]
    assert metrics["textures"]["patchcore_image_auroc"] == pytest.approx(
        peers.filter((pl.col("method") == "patchcore") & (pl.col("dataset") == "textures"))["image_auroc"].mean(),
        abs=1e-4)
    _check_report(project, table)
    _bad_params_change_nothing(params_dict, project)
    table = table.filter((pl.col("protocol") != "C") & (pl.col("method") == "projector"))
    assert table.height == (2 + 2) * 2 * 2  # (categories + digit classes) x distributions x norms
    assert table.filter(pl.col("protocol") == "B")["aupro"].is_between(0, 1).all()
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

    # A new norm reruns only its own train/score stages and the report; extraction is untouched.
    params_dict["sweep"]["norms"] = [1, 3]
    write_params(params_dict, project)
    second = _stagesrun_checked(run_checked(["dvc", "repro"], project))
    assert second == {"validate", "train@3", "score@3", "report"}
    table = read_results(project / "reports/results.csv").filter(
        (pl.col("protocol") != "C") & (pl.col("method") == "projector"))
    assert sorted(set(table["norm"])) == [1.0, 3.0]
    assert table.height == (2 + 2) * 2 * 2  # the dropped norm 8 leaves no stale rows


# Bad params a user may write, and the key the failure must name (None: DVC itself refuses the dvc.yaml).
BAD_PARAMS = [
    ("score", "sigma", -1, "score.sigma"),
    ("backbone", "name", "tf_efficientnet_lite9", "backbone.name"),
    ("center", "norm", float("nan"), "center.norm"),
    ("center", "seed", "abc", "center.seed"),
    ("extract", "level", -5, "extract.level"),
    ("score", "squared", "no", "score.squared"),
    ("backbone", "layers", [1, 2, 9], "backbone.layers"),
    ("backbone", "weights", "/nowhere/weights.pth", "backbone.weights"),
    ("protocol_c", "datasets", ["mvtec"], "protocol_c.datasets"),
    ("center", "seed", 2**32, "center.seed"),
    ("embedded_data", "crop", 300, "embedded_data.crop"),
    ("backbone", "weights", "{junk}", "backbone.weights"),  # a file that exists but holds no weights
    ("embedded_data", "output", "data/mine", "embedded_data.output"),  # a user's folder inside the project
    ("embedded_data", "output", "../victim", None),  # DVC itself refuses outputs outside the repository
]


def _snapshot(project: Path) -> dict[str, bytes]:
    skip = {".git", ".dvc"}
    return {str(p.relative_to(project)): p.read_bytes() for p in sorted(project.rglob("*"))
            if p.is_file() and not skip & set(p.relative_to(project).parts) and p.name != "params.yaml"}


def _bad_params_change_nothing(params_dict: dict, project: Path) -> None:
    """A finished pipeline's outputs are byte-identical after a `dvc repro` that fails on a bad param."""
    victim = project.parent / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (project / "data/mine").mkdir()
    (project / "data/mine/keep.txt").write_text("mine")
    junk = project.parent / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    before = _snapshot(project)
    assert any(name.startswith("data/features/") for name in before)
    for section, key, value, named in BAD_PARAMS:
        bad = copy.deepcopy(params_dict)
        bad[section][key] = value.format(junk=junk) if isinstance(value, str) else value
        write_params(bad, project)
        result = subprocess.run(["dvc", "repro"], cwd=project, env=DVC_ENV, capture_output=True, text=True)
        assert result.returncode != 0, f"{section}.{key}={value!r} did not fail"
        if named is not None:
            assert named in result.stdout + result.stderr, (named, result.stdout[-2000:], result.stderr[-2000:])
        after = _snapshot(project)
        changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name))
        assert not changed, f"{section}.{key}={value!r} changed {changed[:5]}"
    assert (victim / "keep.txt").read_text() == "mine"
    shutil.rmtree(project / "data/mine")
    write_params(params_dict, project)
    assert _stagesrun_checked(run_checked(["dvc", "repro"], project)) == set()  # the good params again: nothing reruns


def _section(report: str, title: str) -> str:
    body = report.split(f"## {title}\n", 1)[1]
    return body.split("\n## ", 1)[0]


def _table_rows(section: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("|---")]


def _check_report(project: Path, results: pl.DataFrame) -> None:
    from polarocc.pipeline.report import SECTIONS

    report = (project / "reports/report.md").read_text()
    for title in SECTIONS:
        assert f"## {title}\n" in report
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):  # every linked plot exists
        assert (project / "reports" / link).stat().st_size > 5_000, link
    default = results.filter((pl.col("method") == "projector") & (pl.col("distribution") == "normal")
                             & (pl.col("norm") == 1.0) & (pl.col("protocol") != "C"))
    headline = {(r[0], r[1]): r for r in _table_rows(_section(report, "Headline"))[1:]}
    for dataset in ("textures", "digits"):
        ours = default.filter(pl.col("dataset") == dataset)
        assert float(headline[(dataset, "projector")][2]) == pytest.approx(ours["image_auroc"].mean(), abs=6e-5)
    assert float(headline[("textures", "projector")][4]) == pytest.approx(
        default.filter(pl.col("dataset") == "textures")["aupro"].mean(), abs=6e-5)
    per_category = _table_rows(_section(report, "Per category (Table S4)"))
    columns = per_category[0]
    for row in per_category[1:]:
        expected = default.filter((pl.col("dataset") == row[0]) & (pl.col("category") == row[1]))
        assert float(row[columns.index("projector image")]) == pytest.approx(expected["image_auroc"].item(), abs=6e-5)
    table4 = _table_rows(_section(report, "Center distributions (Table 4)"))
    ones = results.filter((pl.col("method") == "projector") & (pl.col("distribution") == "ones")
                          & (pl.col("norm") == 1.0) & (pl.col("dataset") == "textures"))
    row = next(r for r in table4 if r[0] == "ones")
    assert float(row[table4[0].index("textures")]) == pytest.approx(ones["image_auroc"].mean(), abs=6e-5)
