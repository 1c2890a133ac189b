"""What DVC shows: the norm sweep as a series per dataset and distribution, and an `exp show` that fits 100 columns."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import polars as pl
import pytest
import yaml

from polarocc.pipeline.aggregate import NORM_SWEEP_DIR, SERIES_COLUMNS, norm_sweep_series, write_norm_sweep_series
from tests.conftest import ROOT, write_params

ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "COLUMNS": "100"}
DATASETS = ("digits", "textures")
DISTRIBUTIONS = ("feature_mean", "normal", "ones", "uniform")
NORMS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# README recipe: one `dvc exp show` per group of columns, each table within 100 columns (all of them in one table
# are ~230 columns wide, and rich collapses what does not fit into "…").
EXP_SHOW_GROUPS = (r"textures\.(image_auroc|pixel_auroc|aupro)", r"digits\.image_auroc|textures\.online_image_auroc",
                   r"textures\.(patchcore|padim)_image_auroc", r"center\.(distribution|norm)|sweep\.norms",
                   r"sweep\.distributions")
HEADLINE = ("textures.image_auroc", "textures.pixel_auroc", "textures.aupro", "digits.image_auroc",
            "textures.online_image_auroc", "textures.patchcore_image_auroc", "textures.padim_image_auroc",
            "center.distribution", "center.norm", "sweep.norms", "sweep.distributions")


def _run(args: list[str], cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def _exp_show(group: str, *extra: str) -> list[str]:
    return ["dvc", "exp", "show", "--no-pager", "--drop", ".*", "--keep", f"Experiment$|({group})$", *extra]


def _sweep_means() -> pl.DataFrame:
    """Sweep means as `sweep_means` returns them: 2 datasets x 4 distributions x 7 norms."""
    rows = [{"method": "projector", "protocol": "A" if dataset == "digits" else "B", "dataset": dataset,
             "distribution": distribution, "norm": norm, "image_auroc": 0.9 - 0.01 * i - 0.001 * j,
             "pixel_auroc": None if dataset == "digits" else 0.95, "aupro": None, "image_f1_max": 0.5,
             "pixel_f1_max": None, "categories": 3}
            for dataset in DATASETS for i, distribution in enumerate(DISTRIBUTIONS) for j, norm in enumerate(NORMS)]
    return pl.DataFrame(rows, schema_overrides={k: pl.Float64 for k in ("pixel_auroc", "aupro", "pixel_f1_max")})


def _git_dvc_init(project: Path) -> None:
    _run(["git", "init", "-q"], project)
    _run(["dvc", "init", "-q"], project)


def _norm_sweep_plot() -> dict:
    """The project's norm-sweep plot definition from dvc.yaml."""
    [entry] = [e for e in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
               if isinstance(e, dict) and "reports/norm_sweep" in e]
    return entry


def test_norm_sweep_series_split_per_dataset() -> None:
    series = norm_sweep_series(_sweep_means())
    assert sorted(series) == list(DATASETS)
    for dataset, table in series.items():
        assert table.columns == SERIES_COLUMNS and set(table["dataset"]) == {dataset}
        assert table.group_by("distribution").agg(pl.col("norm")).sort("distribution").rows() == [
            (d, list(NORMS)) for d in DISTRIBUTIONS]
        assert table["log2_norm"].to_list() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0] * len(DISTRIBUTIONS)


@pytest.mark.integration
def test_run_aggregate_writes_norm_sweep_series(extracted_project: Path, tmp_path: Path) -> None:
    from polarocc.config import load_params
    from polarocc.pipeline.aggregate import run_aggregate
    from polarocc.pipeline.score import run_score
    from polarocc.pipeline.train import run_train

    folder = tmp_path / "project"
    shutil.copytree(extracted_project, folder)
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["protocol_c"]["datasets"] = []  # no online stage or peers needed for the sweep
    raw["peers"]["methods"] = []
    raw["sweep"] = {"norms": [1, 8], "distributions": ["normal", "ones"]}
    params = load_params(write_params(raw, folder))
    for norm in params.sweep.norms:
        run_train(params, norm, progress=False)
        run_score(params, norm, progress=False)
    series_dir = folder / "reports" / NORM_SWEEP_DIR
    series_dir.mkdir(parents=True)
    (series_dir / "dropped.csv").write_text(",".join(SERIES_COLUMNS) + "\n")  # a dataset no longer swept
    (series_dir / "notes.csv").write_text("anything,else\n")  # not written by the aggregate: kept

    metrics = run_aggregate(params)

    assert sorted(p.name for p in series_dir.iterdir()) == ["mine.csv", "notes.csv"]
    mine = pl.read_csv(series_dir / "mine.csv")
    assert mine.columns == SERIES_COLUMNS and set(mine["dataset"]) == {"mine"}
    assert mine.select("distribution", "norm", "log2_norm").rows() == [
        ("normal", 1.0, 0.0), ("normal", 8.0, 3.0), ("ones", 1.0, 0.0), ("ones", 8.0, 3.0)]
    whole = pl.read_csv(folder / "reports/norm_sweep.csv").filter(pl.col("dataset") == "mine")
    assert mine["image_auroc"].to_list() == whole.sort(["distribution", "norm"])["image_auroc"].to_list()
    default = mine.filter((pl.col("distribution") == "normal") & (pl.col("norm") == 1.0))
    assert metrics["mine"]["image_auroc"] == pytest.approx(default["image_auroc"].item(), abs=1e-4)
    assert json.loads((folder / "reports/metrics.json").read_text()) == metrics
    assert (folder / "reports/plots/norm_sweep.png").stat().st_size > 10_000
    assert not list((folder / "reports").rglob("*.partial"))  # every write went through polarocc.atomic


@pytest.mark.integration
def test_dvc_plots_show_a_series_per_dataset_and_distribution(tmp_path: Path) -> None:
    project = tmp_path / "plots"
    project.mkdir()
    _git_dvc_init(project)
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": [_norm_sweep_plot()]}, sort_keys=False))
    write_norm_sweep_series(_sweep_means(), project / "reports" / NORM_SWEEP_DIR)

    shown = json.loads(_run(["dvc", "plots", "show", "--json"], project))
    assert not shown.get("errors")
    for dataset in DATASETS:
        (plot,) = shown["data"][f"reports/norm_sweep/{dataset}.csv"]
        spec = plot["content"]
        assert "loess" not in json.dumps(spec)
        assert spec["encoding"]["color"]["field"] == "distribution"
        assert spec["encoding"]["x"]["field"] == "norm" and spec["encoding"]["x"]["scale"] == {"type": "log",
                                                                                                  "base": 2}
        assert spec["encoding"]["y"]["field"] == "image_auroc"
        points: dict[tuple[str, str], list[float]] = {}
        for row in spec["data"]["values"]:
            assert row["dataset"] == dataset
            points.setdefault((row["distribution"], row["rev"]), []).append(float(row["norm"]))
        assert points == {(d, "workspace"): list(NORMS) for d in DISTRIBUTIONS}

    _run(["dvc", "plots", "show", "-o", "html"], project)
    html = (project / "html" / "index.html").read_text()
    assert html.count('"field": "distribution"') == len(DATASETS)


@pytest.mark.integration
def test_exp_show_recipe_fits_100_columns(tmp_path: Path) -> None:
    project = tmp_path / "exp"
    (project / "reports").mkdir(parents=True)
    shutil.copy(ROOT / "params.yaml", project)
    shutil.copy(ROOT / "reports" / "metrics.json", project / "reports" / "base.json")
    (project / "dvc.yaml").write_text(yaml.safe_dump({
        "params": ["params.yaml"],
        "stages": {"aggregate": {"cmd": "python -c \"import shutil; shutil.copy('reports/base.json', "
                                        "'reports/metrics.json')\"",
                                 "deps": ["reports/base.json"], "params": ["sweep", "center"],
                                 "metrics": [{"reports/metrics.json": {"cache": False}}]}}}, sort_keys=False))
    _git_dvc_init(project)
    _run(["dvc", "repro", "-q"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline"], project)

    def tables() -> tuple[str, str]:
        rich = "".join(_run(_exp_show(group), project) for group in EXP_SHOW_GROUPS)
        markdown = "".join(_run(_exp_show(group, "--md"), project) for group in EXP_SHOW_GROUPS)
        return rich, markdown

    fresh, _ = tables()  # a fresh clone: the workspace and HEAD alike
    for name in HEADLINE:
        assert name in fresh, name
    _run(["dvc", "exp", "run", "-q", "-n", "norms-1-3", "-S", "sweep.norms=[1,3]"], project)
    rich, markdown = tables()
    for output in (rich, markdown):
        lines = output.splitlines()
        assert max(map(len, lines)) <= 100 and "…" not in output
        for name in HEADLINE:
            assert name in output, name
        assert any("[norms-1-3]" in line and "[1, 3]" in line for line in lines)
