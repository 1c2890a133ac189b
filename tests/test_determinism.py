"""The same params and data give byte-identical results on CPU, from extraction to metrics.json."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from polarocc.config import load_params
from polarocc.pipeline.aggregate import run_aggregate
from polarocc.pipeline.analyze import run_analyze
from polarocc.pipeline.export import run_export
from polarocc.pipeline.extract import run_extract
from polarocc.pipeline.online import run_online
from polarocc.pipeline.peers import run_peers
from polarocc.pipeline.report import run_report
from polarocc.pipeline.score import run_score
from polarocc.pipeline.train import run_train

pytestmark = pytest.mark.integration


def _run_everything(folder: Path) -> None:
    params = load_params(folder / "params.yaml")
    run_extract(params, "mine", progress=False)
    for norm in params.sweep.norms:
        run_train(params, norm, progress=False)
        run_score(params, norm, progress=False)
    run_online(params, "mine", progress=False)
    run_peers(params, progress=False)
    run_export(params, progress=False)
    run_analyze(params, progress=False)
    run_aggregate(params)
    run_report(params)


def test_two_runs_give_byte_identical_metrics(extracted_project: Path, tmp_path: Path) -> None:
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        shutil.copytree(extracted_project, folder)
        shutil.rmtree(folder / "data")  # extract again from the images
        _run_everything(folder)
        runs.append(folder)
    for report in ("reports/metrics.json", "reports/results.csv", "reports/variants/norm-1.json",
                   "reports/online/mine.json", "reports/peers.json", "reports/analysis/cosines.json",
                   "reports/analysis/budget.json", "reports/feasibility.csv", "reports/report.md"):
        assert (runs[0] / report).read_bytes() == (runs[1] / report).read_bytes(), report
