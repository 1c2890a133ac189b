"""The README's "Your own images" path on real texture photos with synthetic defects: the notebook example and
`polarocc fit` + `polarocc predict`, with default settings, flag most defective and few good images."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polarocc.data.textures import TextureSpec, make_textures
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

SPEC = TextureSpec(train=30, test_good=10, defects_per_type=3)  # the embedded generator's image size and crop


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project-like folder holding data/textures/brick (MVTec layout), not the pipeline's own copy."""
    folder = tmp_path_factory.mktemp("own")
    make_textures(folder / "data" / "textures", ("brick",), SPEC, seed=11)
    return folder


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Your own images"):text.index("## What the pipeline does")]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _defective(paths: list[Path]) -> np.ndarray:
    return np.array([p.parent.name != "good" for p in paths])


def _predict(model: Path, folder: Path, out: Path) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """`polarocc predict` on ``folder``: (defective, anomalous) flags per image and the scores.csv rows."""
    subprocess.run([sys.executable, "-m", "polarocc.cli", "predict", str(model), str(folder), "-o", str(out)],
                   capture_output=True, text=True, check=True)
    with (out / "scores.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return _defective([Path(r["path"]) for r in rows]), np.array([r["anomalous"] == "True" for r in rows]), rows


def test_the_readme_notebook_example_runs_and_flags_the_defects(textures: Path, monkeypatch) -> None:
    monkeypatch.chdir(textures)
    namespace: dict = {}
    exec(compile(_readme_example(), "README.md", "exec"), namespace)  # the example exactly as documented
    test = sorted((textures / "data/textures/brick/test").rglob("*.png"))
    defective = _defective(test)
    flags = namespace["flags"]
    assert len(flags) == len(test) and len(namespace["scores"]) == len(test)
    assert flags[defective].mean() >= 0.8, "most defective images are flagged"
    assert flags[~defective].mean() <= 0.2, "few good images are flagged"
    holes = sorted((textures / "data/textures/brick/test/hole").glob("*.png"))
    assert [m.shape for m in namespace["maps"]] == [Image.open(p).size[::-1] for p in holes]
    assert (textures / "brick.pt").is_file()


def test_fit_then_predict_on_the_command_line(textures: Path, tmp_path: Path) -> None:
    brick = textures / "data/textures/brick"
    fitted = subprocess.run(
        [sys.executable, "-m", "polarocc.cli", "fit", str(brick / "train/good"), "-o", str(tmp_path / "m.pt"),
         "--test", str(brick / "test"), "--masks", str(brick / "ground_truth")],
        capture_output=True, text=True, check=True).stdout
    auroc = float(re.search(r"image ROC AUC ([\d.]+), pixel ROC AUC ([\d.]+), AUPRO ([\d.]+)", fitted).group(1))
    assert auroc >= 0.9
    flagged = re.search(r"(\d+) of (\d+) defective and (\d+) of (\d+) good images flagged", fitted)
    hit, defects, false, good = map(int, flagged.groups())
    assert hit >= 0.8 * defects and false <= 0.2 * good
    defective, anomalous, rows = _predict(tmp_path / "m.pt", brick / "test", tmp_path / "out")
    normalized = np.array([float(r["normalized_score"]) for r in rows])
    assert np.array_equal(anomalous, normalized > 1)
    assert anomalous[defective].sum() == hit and anomalous[~defective].sum() == false  # predict agrees with fit


def test_a_clean_cold_start_stream_saves_a_threshold_that_flags_defects(textures: Path, tmp_path: Path) -> None:
    # The report behind issue 13: `stream --cold-start --clean ... --quantile 0.99 --save-model` then `predict`
    # flagged none of the defects, the threshold coming from scores the barely trained model gave early images.
    brick = textures / "data/textures/brick"
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    subprocess.run([sys.executable, "-m", "polarocc.cli", "stream", str(brick / "train/good"), "--cold-start",
                    "--clean", "--quantile", "0.99", "--save-model", str(tmp_path / "m.pt"), "--csv",
                    str(tmp_path / "s/rows.csv"), "--state", str(tmp_path / "s/state.pt"), "-p",
                    str(tmp_path / "params.yaml")], capture_output=True, text=True, check=True, cwd=tmp_path)
    defective, anomalous, _ = _predict(tmp_path / "m.pt", brick / "test", tmp_path / "out")
    assert anomalous[defective].mean() >= 0.5, f"{anomalous[defective].sum()} of {defective.sum()} flagged"
