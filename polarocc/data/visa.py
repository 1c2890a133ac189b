"""Convert the original VisA release into MVTec AD layout (as anomalib does), binarising its masks.

Original layout::

    <root>/split_csv/1cls.csv                 object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png  (non-zero = defect)

Result::

    <out>/<object>/{train/good, test/good, test/bad, ground_truth/bad/<stem>_mask.png}

The CSV is data, not trusted: every row is checked (object names are single path components, image and
mask paths stay inside ``root``, files exist, labels are known) before anything is written, and ``out``
must be new, empty or an earlier conversion's (it carries polarocc's ownership marker).
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from polarocc.atomic import save_image
from polarocc.data.images import image_size, open_image
from polarocc.errors import DataError, UnsafePathError
from polarocc.ownership import claim, inside, record, safe_name

SPLIT_CSV = Path("split_csv/1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")
OUT_KEY = "convert-visa OUT"


@dataclass(frozen=True)
class _Item:
    """One validated CSV row: the image to place and, for an anomaly, the mask to binarise."""

    line: int
    obj: str
    folder: str
    image: Path  # resolved, inside root
    target: Path  # inside out
    mask: Path | None = None  # resolved, inside root
    mask_target: Path | None = None


def _place(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` through a temporary sibling and a rename: an existing ``dst`` (an earlier run's copy)
    is replaced, never written through."""
    if dst.is_file() and os.path.samefile(src, dst):
        return  # an earlier run's hard link to this very image (renaming onto it would be a no-op anyway)
    dst.parent.mkdir(parents=True, exist_ok=True)
    temporary = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()  # our own leftover from a crashed run of this process id
    try:
        try:
            os.link(src, temporary)  # no copy of the images when source and output share a file system
        except OSError:
            shutil.copy2(src, temporary)
        os.replace(temporary, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


def _read_rows(root: Path) -> list[tuple[int, dict[str, str]]]:
    """(line number, row) of ``split_csv/1cls.csv``, checked for the expected columns."""
    path = Path(root) / SPLIT_CSV
    if not path.is_file():
        raise DataError(f"{path} not found: point the path at the original VisA folder (the one holding split_csv/)")
    try:
        # utf-8-sig: a byte-order mark (as spreadsheet programs write) is not part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
            # a short row leaves None in its missing columns; the line number names the row in errors
            return [(reader.line_num, {c: (row.get(c) or "").strip() for c in COLUMNS}) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path} is not a UTF-8 CSV file ({exc}); save it as UTF-8 text with the columns "
                        f"{', '.join(COLUMNS)}") from exc


def read_split_csv(root: Path) -> list[dict[str, str]]:
    """Rows of ``split_csv/1cls.csv``, checked for the expected columns."""
    return [row for _, row in _read_rows(root)]


def _source(root: Path, row: dict[str, str], column: str, line: int) -> Path:
    """The file a row's ``image`` or ``mask`` column names, resolved and checked to lie inside ``root``."""
    key = f"{SPLIT_CSV} line {line} {column}"
    if not row[column]:
        raise DataError(f"{key} is empty; every {'anomalous ' if column == 'mask' else ''}row needs a {column} path")
    path = inside(root, root / row[column], key)
    if not path.is_file():
        raise DataError(f"{key}: {row[column]} does not exist ({path}); point the path at the complete VisA "
                        "folder or fix the row")
    return path


def _plan(root: Path, out: Path, line: int, row: dict[str, str]) -> _Item:
    """Validate one row and work out where its files go; writes nothing."""
    obj = safe_name(row["object"], f"{SPLIT_CSV} line {line} object")
    split, label = row["split"], row["label"]
    if split not in ("train", "test"):
        raise DataError(f"{SPLIT_CSV} line {line} split: {split!r} is neither 'train' nor 'test'")
    if label not in ("normal", "anomaly"):
        raise DataError(f"{SPLIT_CSV} line {line} label: {label!r} is neither 'normal' nor 'anomaly'")
    image = _source(root, row, "image", line)
    name = Path(row["image"]).name  # as listed: the resolved file may be a link with another name
    if label == "normal":
        folder = "train/good" if split == "train" else "test/good"
        return _Item(line, obj, folder, image, inside(out, out / obj / folder / name, OUT_KEY))
    if split == "train":
        raise DataError(f"{SPLIT_CSV} line {line} puts the anomalous image {row['image']} in the training split")
    if not row["mask"]:
        raise DataError(f"anomalous VisA image {root / row['image']} has no mask file (empty mask column at "
                        f"{SPLIT_CSV} line {line}); fix the row")
    if not (root / row["mask"]).is_file():
        raise DataError(f"anomalous VisA image {root / row['image']} has no mask file ({row['mask']} does not "
                        f"exist; {SPLIT_CSV} line {line}); restore the mask or fix the row")
    mask = _source(root, row, "mask", line)
    try:
        image_size(mask)  # a file that is no image (or too large) fails now, before anything is written
    except DataError as exc:
        raise DataError(f"{SPLIT_CSV} line {line} mask: {exc}") from exc
    return _Item(line, obj, "test/bad", image, inside(out, out / obj / "test/bad" / name, OUT_KEY), mask,
                 inside(out, out / obj / "ground_truth/bad" / f"{Path(name).stem}_mask.png", OUT_KEY))


def convert_visa(root: Path, out: Path, categories: list[str] | None = None, progress: bool = True) -> dict:
    """Write the MVTec-layout copy of VisA under ``out``; returns image counts per object and folder.

    Every row is validated first, so a bad CSV writes nothing; ``out`` must be absent, empty or written by an
    earlier ``convert_visa`` (whose files are then replaced).
    """
    root, out = Path(root), Path(out)
    rows = _read_rows(root)
    if categories is not None:
        wanted = {safe_name(c, "--category") for c in categories}
        unknown = sorted(wanted - {r["object"] for _, r in rows})
        if unknown:
            raise DataError(f"VisA has no object(s) {', '.join(unknown)}; --category takes names from the "
                            f"object column of {SPLIT_CSV}")
        rows = [(line, r) for line, r in rows if r["object"] in wanted]
    plan = [_plan(root, out, line, row) for line, row in rows]
    seen: dict[Path, int] = {}
    for item in plan:
        for target in filter(None, (item.target, item.mask_target)):
            if target in seen:  # two rows writing one file: the second would silently replace the first
                raise DataError(f"{SPLIT_CSV} lines {seen[target]} and {item.line} both write {target}; image "
                                "file names must be unique per object and folder")
            seen[target] = item.line
    marker = claim(out, OUT_KEY, "convert-visa")
    base = out.resolve()
    targets = [t for item in plan for t in (item.target, item.mask_target) if t is not None]
    names = [t.relative_to(base).as_posix() for t in targets]
    foreign = [t for name, t in zip(names, targets, strict=True)
               if (t.exists() or t.is_symlink()) and name not in marker["files"]]
    if foreign:
        raise UnsafePathError(f"{OUT_KEY}: {foreign[0]} exists and was not written by polarocc convert-visa; move "
                              "it away or choose another OUT")
    record(out, "convert-visa", names)  # before writing: a run stopped half-way may replace them next time
    counts: Counter[tuple[str, str]] = Counter()
    for item in tqdm(plan, desc="convert VisA", unit="image", disable=not progress):
        if item.mask is not None and item.mask_target is not None:
            mask = np.asarray(open_image(item.mask).convert("L")) > 0
            # checked again now that the folders exist: a link placed inside out must not lead outside it
            save_image(inside(out, item.mask_target, f"{OUT_KEY} mask of line {item.line}"),
                       Image.fromarray(mask.astype(np.uint8) * 255))
        _place(item.image, inside(out, item.target, f"{OUT_KEY} image of line {item.line}"))
        counts[(item.obj, item.folder)] += 1
    result: dict[str, dict[str, int]] = {}
    for (obj, folder), n in sorted(counts.items()):
        result.setdefault(obj, {})[folder] = n
    return result
