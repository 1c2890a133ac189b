"""Convert the original VisA release into MVTec AD layout (as anomalib does), binarising its masks.

Original layout::

    <root>/split_csv/1cls.csv                 object,split,label,image,mask
    <root>/<object>/Data/Images/{Normal,Anomaly}/*.JPG
    <root>/<object>/Data/Masks/Anomaly/*.png  (non-zero = defect)

Result::

    <out>/<object>/{train/good, test/good, test/bad, ground_truth/bad/<stem>_mask.png}
"""

from __future__ import annotations

import csv
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from polarocc.errors import DataError

SPLIT_CSV = Path("split_csv/1cls.csv")
COLUMNS = ("object", "split", "label", "image", "mask")


def _place(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)  # no copy of the images when source and output share a file system
    except OSError:
        shutil.copy2(src, dst)


def read_split_csv(root: Path) -> list[dict[str, str]]:
    """Rows of ``split_csv/1cls.csv``, checked for the expected columns."""
    path = Path(root) / SPLIT_CSV
    if not path.is_file():
        raise DataError(f"{path} not found: point the path at the original VisA folder (the one holding split_csv/)")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path} lacks the column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
        return list(reader)


def convert_visa(root: Path, out: Path, categories: list[str] | None = None, progress: bool = True) -> dict:
    """Write the MVTec-layout copy of VisA under ``out``; returns image counts per object and folder."""
    root, out = Path(root), Path(out)
    rows = read_split_csv(root)
    if categories is not None:
        unknown = sorted(set(categories) - {r["object"] for r in rows})
        if unknown:
            raise DataError(f"VisA has no object(s) {', '.join(unknown)}")
        rows = [r for r in rows if r["object"] in categories]
    counts: Counter[tuple[str, str]] = Counter()
    for row in tqdm(rows, desc="convert VisA", unit="image", disable=not progress):
        obj, split, label = row["object"], row["split"].strip(), row["label"].strip()
        image = root / row["image"]
        if not image.is_file():
            raise DataError(f"{SPLIT_CSV} lists {row['image']} but {image} does not exist")
        if label == "normal":
            folder = "train/good" if split == "train" else "test/good"
        elif split == "test":
            folder = "test/bad"
            mask_src = root / row["mask"] if row["mask"] else None
            if mask_src is None or not mask_src.is_file():
                raise DataError(f"anomalous VisA image {image} has no mask file ({row['mask'] or 'empty column'})")
            mask = np.asarray(Image.open(mask_src).convert("L")) > 0
            target = out / obj / "ground_truth/bad" / f"{image.stem}_mask.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(target)
        else:
            raise DataError(f"{SPLIT_CSV} puts the anomalous image {row['image']} in the training split")
        _place(image, out / obj / folder / image.name)
        counts[(obj, folder)] += 1
    result: dict[str, dict[str, int]] = {}
    for (obj, folder), n in sorted(counts.items()):
        result.setdefault(obj, {})[folder] = n
    return result
