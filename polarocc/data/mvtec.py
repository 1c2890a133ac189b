"""Reader for MVTec AD, MPDD and any folder in MVTec AD layout.

Layout::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/<stem>.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tqdm import tqdm

from polarocc.data.images import open_image
from polarocc.data.samples import NORMAL_TYPE, Sample
from polarocc.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SPLITS = ("train", "test")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(image: Path, truth: Path) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        candidate = truth / f"{image.stem}_mask{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_split(root: Path, category: str, split: str) -> list[Sample]:
    """List the samples of one category and split; a defective image's mask is
    ``ground_truth/<defect_type>/<stem>_mask.*`` where one exists, else None (see :func:`missing_masks`)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    base = Path(root) / category / split
    if not base.is_dir():
        raise DataError(f"{base} does not exist: an MVTec-layout category needs {split}/ (see README)")
    samples: list[Sample] = []
    for folder in sorted(p for p in base.iterdir() if p.is_dir()):
        kind = folder.name
        if split == "train" and kind != NORMAL_TYPE:
            continue
        for image in _images(folder):
            if kind == NORMAL_TYPE:
                samples.append(Sample(image, 0))
                continue
            samples.append(Sample(image, 1, kind, _mask_for(image, Path(root) / category / "ground_truth" / kind)))
    if not samples:
        raise DataError(f"{base} holds no images: category '{category}' is empty")
    if split == "train" and not any(s.label == 0 for s in samples):
        raise DataError(f"{base / NORMAL_TYPE} holds no normal training images")
    return samples


def missing_masks(samples: list[Sample]) -> dict[str, int]:
    """Defective images without a mask, per defect type: a category with any is image-level (its pixel metrics
    are left out, since those of the masked defect types alone would not describe the category)."""
    missing: dict[str, int] = {}
    for s in samples:
        if s.label == 1 and s.mask_path is None:
            missing[s.defect_type] = missing.get(s.defect_type, 0) + 1
    return missing


def read_test_folder(test: Path, truth: Path | None = None) -> list[Sample]:
    """The labelled images of an MVTec-layout ``test`` folder on its own: ``good/`` normal, every other folder a
    defect type; each defect's mask from ``truth/<defect_type>/<stem>_mask.*`` where ``truth`` (the category's
    ``ground_truth`` folder) is given and holds one, else none (image-level labels only)."""
    test = Path(test)
    if not test.is_dir():
        raise DataError(f"test folder {test} does not exist")
    if truth is not None and not Path(truth).is_dir():
        raise DataError(f"mask folder {truth} does not exist")
    samples: list[Sample] = []
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):
        for image in _images(folder):
            if folder.name == NORMAL_TYPE:
                samples.append(Sample(image, 0))
            else:
                mask = None if truth is None else _mask_for(image, Path(truth) / folder.name)
                samples.append(Sample(image, 1, folder.name, mask))
    if not any(s.label == 0 for s in samples) or not any(s.label == 1 for s in samples):
        raise DataError(f"test folder {test} needs good/ and at least one defect folder with images "
                        "(MVTec layout: test/good, test/<defect_type>)")
    return samples


def check_files(samples: list[Sample], progress: bool = True) -> None:
    """Decode every image and mask once before any feature is computed.

    Fails on an unreadable or truncated file and on a mask whose size differs from its image's; warns
    (and later binarises, non-zero = defect) when a mask is not binary.
    """
    for sample in tqdm(samples, desc="  checking files", unit="image", disable=not progress or len(samples) < 200,
                       leave=False):
        img = open_image(sample.path)
        if sample.mask_path is None:
            continue
        mask = open_image(sample.mask_path)
        if img.size != mask.size:
            raise DataError(
                f"mask {sample.mask_path} is {mask.size[0]}x{mask.size[1]} but its image {sample.path} is "
                f"{img.size[0]}x{img.size[1]}; masks must have the image's size"
            )
        values = np.unique(np.asarray(mask.convert("L")))
        if len(values) > 2 or (len(values) == 2 and values[0] != 0):
            warnings.warn(f"mask {sample.mask_path} is not binary (values {values.min()}..{values.max()}); "
                          "it is binarised: every non-zero pixel counts as defective", stacklevel=2)
