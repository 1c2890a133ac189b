"""The polarocc command line."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from polarocc.cli import app
from tests.conftest import write_params

runner = CliRunner()


def test_validate(params_dict: dict, tmp_path: Path) -> None:
    params = write_params(params_dict, tmp_path)
    ok = runner.invoke(app, ["validate", "--params", str(params)])
    assert ok.exit_code == 0 and "2 categories, 4 center variants" in ok.output
    params_dict["center"]["distribution"] = "laplace"
    bad = runner.invoke(app, ["validate", "--params", str(write_params(params_dict, tmp_path))])
    assert bad.exit_code == 2 and "center.distribution" in bad.output


def test_results_reads_numeric_class_names(params_dict: dict, tmp_path: Path) -> None:
    params = write_params(params_dict, tmp_path)
    missing = runner.invoke(app, ["results", "--params", str(params)])
    assert missing.exit_code == 2 and "run `dvc repro` first" in missing.output
    rows = ["method,protocol,dataset,category,distribution,norm,image_auroc,pixel_auroc,aupro"]
    rows += [f"projector,A,digits,{i},normal,1.0,0.9,," for i in range(200)]
    rows += ["projector,B,textures,brick,normal,1.0,0.8,0.7,0.6"]
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/results.csv").write_text("\n".join(rows) + "\n")
    table = runner.invoke(app, ["results", "--params", str(params), "--per-category", "--dataset", "textures"])
    assert table.exit_code == 0, table.output
    assert "brick" in table.output and "0.7" in table.output
