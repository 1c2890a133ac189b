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
from polarocc.errors import DataError, UnsafePathError
from polarocc.ownership import MARKER


def _visa(root: Path, extra: tuple[str, ...] = ()) -> None:
    """A tiny VisA release under ``root``: two objects, three normal and one anomalous image each; ``extra``
    CSV rows are appended."""
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
    (root / "split_csv/1cls.csv").write_text("\n".join([*rows, *extra]) + "\n")


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its content."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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


NORMAL = "candle/Data/Images/Normal/0000.JPG"


def test_object_escaping_out_writes_nothing(tmp_path: Path) -> None:
    _visa(tmp_path / "visa", (f"../../escape,train,normal,{NORMAL},",))
    before = _tree(tmp_path)
    with pytest.raises(UnsafePathError, match=r"split_csv/1cls.csv line 10 object: '../../escape' cannot name"):
        convert_visa(tmp_path / "visa", tmp_path / "work/out", progress=False)
    assert _tree(tmp_path) == before and not (tmp_path / "work").exists()


def test_image_outside_root_is_refused_and_not_linked(tmp_path: Path) -> None:
    outside = tmp_path / "outside.JPG"
    Image.new("RGB", (8, 8)).save(outside, format="JPEG")
    _visa(tmp_path / "visa", ("candle,train,normal,../outside.JPG,",))
    with pytest.raises(UnsafePathError, match=r"line 10 image: .*outside.JPG resolves to .* outside .*visa"):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and outside.stat().st_nlink == 1


def test_mask_outside_root_is_refused(tmp_path: Path) -> None:
    Image.new("L", (8, 8)).save(tmp_path / "secret.png")
    _visa(tmp_path / "visa", (f"pcb1,test,anomaly,{NORMAL},../secret.png",))
    with pytest.raises(UnsafePathError, match=r"line 10 mask: .*secret.png resolves to .* outside"):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("rows", "message"), [
    ((f"pcb1,test,maybe,{NORMAL},",), r"line 10 label: 'maybe' is neither"),
    ((f"pcb1,val,normal,{NORMAL},",), r"line 10 split: 'val' is neither"),
    (("pcb1,test,normal,pcb1/missing.JPG,",), r"line 10 image: pcb1/missing.JPG does not exist"),
    ((f"pcb1,test,anomaly,{NORMAL},split_csv/1cls.csv",), r"line 10 mask: cannot read image .*1cls.csv"),
    ((f"pcb1,test,normal,{NORMAL},", f"pcb1,test,normal,{NORMAL},"),
     r"lines 10 and 11 both write .*pcb1/test/good/0000.JPG"),
])
def test_bad_row_writes_nothing(tmp_path: Path, rows: tuple[str, ...], message: str) -> None:
    _visa(tmp_path / "visa", rows)
    with pytest.raises(DataError, match=message):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_out_not_written_by_polarocc_is_left_alone(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    out = tmp_path / "mine"
    (out / "candle/train/good").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "candle/train/good/0000.JPG").write_bytes(b"my own file")
    before = _tree(out)
    with pytest.raises(UnsafePathError, match=r"convert-visa OUT: .*mine is a folder polarocc did not create"):
        convert_visa(tmp_path / "visa", out, progress=False)
    assert _tree(out) == before


def test_rerun_into_own_output(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    source = _tree(tmp_path / "visa")
    first = convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / MARKER).is_file()
    written = _tree(tmp_path / "out")
    assert convert_visa(tmp_path / "visa", tmp_path / "out", progress=False) == first
    assert _tree(tmp_path / "out") == written and _tree(tmp_path / "visa") == source  # no write through hard links
    assert len(read_split(tmp_path / "out", "candle", "test")) == 2


def test_cli_refuses_unsafe_category(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    result = CliRunner().invoke(app, ["convert-visa", str(tmp_path / "visa"), str(tmp_path / "out"), "-c", "../x"])
    assert result.exit_code == 2 and "--category: '../x' cannot name a folder" in result.output
    assert not (tmp_path / "out").exists()


def test_a_file_someone_else_put_at_a_target_path_is_not_overwritten(tmp_path: Path) -> None:
    _visa(tmp_path / "visa")
    convert_visa(tmp_path / "visa", tmp_path / "out", ["candle"], progress=False)
    mine = tmp_path / "out/pcb1/train/good/0000.JPG"  # where the pcb1 conversion would write
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own photo")
    (tmp_path / "out/README.txt").write_text("notes")  # an unrelated file beside the conversion is fine
    with pytest.raises(UnsafePathError, match=r"0000\.JPG exists and was not written by polarocc convert-visa"):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert mine.read_bytes() == b"my own photo"
    mine.unlink()
    convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert (tmp_path / "out/README.txt").read_text() == "notes"


@pytest.mark.parametrize("encoding", ["utf-16", "cp1252", "utf-8-sig"])
def test_split_csv_encodings(tmp_path: Path, encoding: str) -> None:
    _visa(tmp_path / "visa")
    csv = tmp_path / "visa/split_csv/1cls.csv"
    text = csv.read_text()
    if encoding == "cp1252":
        text = text.replace("candle,train,normal", "cändle,train,normal", 1)
    csv.write_bytes(text.encode(encoding))
    if encoding == "utf-8-sig":  # a byte-order mark, as spreadsheet programs save: read as UTF-8
        assert convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)["candle"]["train/good"] == 2
        return
    with pytest.raises(DataError, match=r"1cls\.csv is not a UTF-8 CSV file"):
        convert_visa(tmp_path / "visa", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
