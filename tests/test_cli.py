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


def test_user_errors_are_one_line_without_traceback(params_dict: dict, tmp_path: Path) -> None:
    cases = []
    (tmp_path / "broken.yaml").write_text("center: {norm: [1\n")
    cases.append((["validate", "--params", str(tmp_path / "broken.yaml")], "not valid YAML"))
    params_dict["backbone"]["layers"] = [1, 2, 9]
    cases.append((["validate", "--params", str(write_params(params_dict, tmp_path))], "backbone.layers"))
    (tmp_path / "fake.pt").write_bytes(b"not a model")
    cases.append((["predict", str(tmp_path / "fake.pt"), str(tmp_path)], "fake.pt"))
    cases.append((["export", "brick", str(tmp_path / "out.pt"), "--params", str(tmp_path / "params.yaml")],
                  "run the extract stage"))
    for args, expected in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
