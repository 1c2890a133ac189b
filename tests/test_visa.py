"""VisA: the original layout with split_csv/1cls.csv converted to MVTec layout, masks binarised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from polarocc.cli import app
from polarocc.data.mvtec import read_split
from polarocc.data.visa import convert_visa
from polarocc.errors import DataError


def _visa(root: Path) -> None:
    rows = ["object,split,label,image,mask"]
    for obj in ("candle", "pcb1"):
        for i in range(3):
            rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30), (i * 40, 0, 0)).save(root / rel, format="JPEG")
            rows.append(f"{obj},{'train' if i < 2 else 'test'},normal,{rel},")
        rel, mask_rel = f"{obj}/Data/Images/Anomaly/000.JPG", f"{obj}/Data/Masks/Anomaly/000.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / mask_rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30)).save(root / rel, format="JPEG")
        mask = np.zeros((30, 40), np.uint8)
        mask[5:10, 5:10] = 1  # VisA masks hold small class ids, not 255
        mask[20:25, 20:25] = 3
        Image.fromarray(mask).save(root / mask_rel)
        rows.append(f"{obj},test,anomaly,{rel},{mask_rel}")
    (root / "split_csv").mkdir()
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")


def test_convert_and_read(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    counts = convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert counts["candle"] == {"test/bad": 1, "test/good": 1, "train/good": 2}
    test = read_split(tmp_path / "out", "pcb1", "test")
    assert [(s.label, s.defect_type) for s in test] == [(1, "bad"), (0, "good")]
    mask = np.asarray(Image.open(test[0].mask_path))
    assert set(np.unique(mask)) == {0, 255} and (mask == 255).sum() == 50
    assert len(read_split(tmp_path / "out", "candle", "train")) == 2


def test_cli_and_category_filter(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    result = CliRunner().invoke(app, ["convert-visa", str(tmp_path / "visa"), str(tmp_path / "out"), "-c", "pcb1"])
    assert result.exit_code == 0, result.output
    assert "pcb1: test/bad 1, test/good 1, train/good 2" in result.output
    assert not (tmp_path / "out/candle").exists()


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"split_csv/1cls.csv not found"):
        convert_visa(tmp_path, tmp_path / "out", progress=False)
    _visa(tmp_path / "visa")
    (tmp_path / "visa/pcb1/Data/Masks/Anomaly/000.png").unlink()
    with pytest.raises(DataError, match=r"anomalous VisA image .*pcb1.*000.JPG has no mask"):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
