"""Bytes a feature store will take, and the free-space check run before extraction starts.

Kept apart from :mod:`polarocc.planning` (the whole-run plan behind ``polarocc plan``) so that the extract stage
depends only on this small module: editing the planner or the metrics it reads never reruns extraction.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping, Sized
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from polarocc.errors import DataError
from polarocc.features.store import StoreLayout

AUTO, STORED, STREAMED = "auto", "stored", "streamed"
GRAM_ITEMSIZE = 8  # float64: the statistics are sums over thousands of pixels and keep full precision


def feature_bytes_per_image(channels: int, height: int, width: int, dtype: str = "float16") -> int:
    """Uncompressed bytes of one image's cached features (float16 features barely compress)."""
    return channels * height * width * np.dtype(dtype).itemsize


def statistics_bytes_per_image(channels: int) -> int:
    """Bytes of one image's stored statistics: its C x C Gram matrix and C-vector of sums, float64."""
    return (channels * channels + channels) * GRAM_ITEMSIZE


def resolve_statistics(mode: str, channels: int, height: int, width: int, feature_dtype: str = "float16") -> str:
    """``stored`` or ``streamed`` for the ``train.statistics`` setting ``mode`` (``auto`` decides by bytes)."""
    if mode != AUTO:
        return mode
    stored = statistics_bytes_per_image(channels)
    return STORED if stored <= 0.5 * feature_bytes_per_image(channels, height, width, feature_dtype) else STREAMED


@dataclass(frozen=True)
class StoreBytes:
    """Uncompressed bytes of the arrays of one or more stores (float16 features barely compress, so this is close
    to what they take on disk)."""

    features: int = 0
    statistics: int = 0  # train/gram (when stored) and train/sums
    masks: int = 0

    @property
    def total(self) -> int:
        """Every array together."""
        return self.features + self.statistics + self.masks

    def __add__(self, other: StoreBytes) -> StoreBytes:
        return StoreBytes(self.features + other.features, self.statistics + other.statistics,
                          self.masks + other.masks)

    def to_dict(self) -> dict[str, int]:
        """JSON-able, with the total."""
        return {**asdict(self), "total": self.total}


def store_bytes(layout: StoreLayout, n_train: int, n_test: int) -> StoreBytes:
    """The arrays :func:`polarocc.features.store.create_or_resume` creates for ``n_train``/``n_test`` images."""
    per_image = feature_bytes_per_image(layout.channels, layout.height, layout.width, layout.dtype)
    features = (n_train + n_test) * per_image
    if layout.image_level:
        return StoreBytes(features=features)
    per_train = statistics_bytes_per_image(layout.channels) if layout.stored_statistics else \
        layout.channels * GRAM_ITEMSIZE
    masks = n_test * layout.mask_shape[0] * layout.mask_shape[1] * np.dtype(bool).itemsize
    return StoreBytes(features, n_train * per_train, masks)


def human_bytes(n: float) -> str:
    """``4.1 GB`` (decimal units, as disk sizes are quoted)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (where a folder that does not exist yet will be made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> tuple[Path, int]:
    """(the nearest existing folder of ``path``, the bytes free on its file system)."""
    where = nearest_existing(path)
    return where, int(shutil.disk_usage(where).free)


def folder_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (0 when it does not exist)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed while walking
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def check_disk_for_extraction(dataset: str, layout: StoreLayout | Mapping[str, StoreLayout],
                              samples: Mapping[str, Mapping[str, Sized]], target: Path, shown: str | None = None,
                              reusable: Iterable[Path] = ()) -> int:
    """DataError unless the stores of ``dataset`` (``samples``: category -> split -> images) fit the free space at
    ``target`` (its nearest existing folder); returns the bytes needed. ``layout``: one for every category, or one
    per category (their input sizes differ when the resize keeps each category's aspect ratio).

    Needed: every store's arrays uncompressed (:func:`store_bytes`), less the bytes of ``reusable`` folders
    (partial stores of an interrupted run: resumed in place, or deleted before the store is rebuilt). Complete
    stores at the output paths are not credited: ``dvc repro`` deletes them before the stage runs.
    """
    needed = StoreBytes()
    for category, splits in samples.items():
        category_layout = layout if isinstance(layout, StoreLayout) else layout[category]
        needed += store_bytes(category_layout, len(splits.get("train", ())), len(splits.get("test", ())))
    credit = sum(folder_bytes(p) for p in reusable)
    where, free = free_bytes(target)
    required = max(needed.total - credit, 0)
    if required > free:
        fix = ("set train.statistics to streamed (stored per-image Gram matrices take "
               f"{human_bytes(needed.statistics)}), " if needed.statistics > needed.features else "")
        raise DataError(
            f"extracting datasets.{dataset} needs {human_bytes(required)} at {shown or target} but only "
            f"{human_bytes(free)} is free on {where}: free space there, {fix}or point the project at a larger disk "
            "(`polarocc plan` shows every output's size)")
    return required
