"""Chunked zarr (v3) stores of cached features, one per dataset category.

Layout of ``<category>.zarr``::

    attrs: fingerprint, backbone, geometry (resize, crop, tiles), layout, complete
    train/features (N, C, H, W)  float16, one chunk per image inside shards of ``shard_images`` images
    train/gram     (N, C, C)     float64 per-image sum_p f_p f_p^T (from the stored, rounded features); only
                                 when the training statistics are ``stored`` (see polarocc.training.statistics)
    train/sums     (N, C)        float64 per-image sum_p f_p (always: the ``feature_mean`` center needs it)
    test/features  (N, C, H, W)
    test/masks     (N, H, W) bool, at the model input's size
    <split>/done   (n_shards,)   bool, set after a shard's arrays are written
    <split> attrs: samples (path, label, defect_type, mask_path per image)

Stores are built under a ``.partial`` path and moved into place with ``os.replace`` when complete; a
partial store is resumed only when its params fingerprint matches, so a crash loses at most the
shard being written and a changed param never reuses stale features.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
import zarr.errors
from zarr.codecs import BloscCodec, BloscShuffle, ZstdCodec

from polarocc.data.samples import Sample
from polarocc.errors import MissingOutputError, ModelError, UnsafePathError
from polarocc.geometry import Geometry
from polarocc.models.centers import make_center

SPLITS = ("train", "test")


def fingerprint(payload: dict[str, Any]) -> str:
    """A stable hash of everything that determines a store's content."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def file_signature(path: Path) -> list[Any]:
    """(path, size, content hash) of a file: the same in every clone, unlike a modification time.

    A sample that is not a file (an image held in an array) is named only; its content enters the
    fingerprint through the caller's digest.
    """
    if not Path(path).is_file():
        return [str(path)]
    data = Path(path).read_bytes()
    return [str(path), len(data), hashlib.sha256(data).hexdigest()[:16]]


def _compressors(name: str, level: int) -> Any:
    if name == "zstd":
        return [ZstdCodec(level=level)]
    if name == "blosc":
        return [BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.bitshuffle)]
    if name == "lz4":  # fastest to write: float16 features compress little whatever the codec
        return [BloscCodec(cname="lz4", clevel=level, shuffle=BloscShuffle.shuffle)]
    return None


@dataclass(frozen=True)
class StoreLayout:
    """Shapes and encodings of a category store."""

    channels: int
    height: int
    width: int
    input_size: int | list[int]  # the model input (masks' shape): a square side or [height, width]
    dtype: str = "float16"
    shard_images: int = 16
    compressor: str = "zstd"
    level: int = 3
    image_level: bool = False  # Protocol A: no Gram statistics (one position per image) and no masks
    stored_statistics: bool = True  # per-image Gram matrices (train.statistics 'stored'); else only sums

    @property
    def mask_shape(self) -> tuple[int, int]:
        """(height, width) of the model input, which masks and anomaly maps share."""
        size = self.input_size
        return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _create(group: zarr.Group, name: str, shape: tuple[int, ...], dtype: str, shard: int,
            layout: StoreLayout, per_image_chunks: bool) -> zarr.Array:
    inner = (1, *shape[1:]) if per_image_chunks else (shard, *shape[1:])
    return group.create_array(name, shape=shape, dtype=dtype, chunks=inner,
                              shards=(shard, *shape[1:]) if per_image_chunks else None,
                              compressors=_compressors(layout.compressor, layout.level), fill_value=0)


def _is_zarr_store(path: Path) -> bool:
    """True for a folder that a zarr v3 group was written to (holds its ``zarr.json``)."""
    return (path / "zarr.json").is_file()


def remove_store(path: Path) -> None:
    """Delete a store polarocc wrote; refuse a path that holds anything but a zarr store."""
    if not _is_zarr_store(path):
        raise UnsafePathError(f"{path} is not a zarr feature store (no zarr.json), so polarocc will not delete it; "
                              "move it away and rerun")
    shutil.rmtree(path)


def create_or_resume(path: Path, fp: str, layout: StoreLayout, samples: dict[str, list[Sample]],
                     attrs: dict[str, Any]) -> zarr.Group:
    """Open the partial store at ``path`` if its fingerprint is ``fp``, else start it afresh."""
    if path.exists():
        try:
            group = zarr.open_group(path, mode="r+")
            if group.attrs.get("fingerprint") == fp:
                return group
        except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):
            pass  # an unreadable leftover of an interrupted run is rebuilt (remove_store checks it is a store)
        remove_store(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(path, mode="w")
    group.attrs.update({**attrs, "fingerprint": fp, "complete": False})
    shard, c, h, w = layout.shard_images, layout.channels, layout.height, layout.width
    for split, items in samples.items():
        n = len(items)
        sub = group.create_group(split)
        sub.attrs["samples"] = [s.to_record() for s in items]
        per_shard = min(shard, n)
        _create(sub, "features", (n, c, h, w), layout.dtype, per_shard, layout, per_image_chunks=True)
        sub.create_array("done", shape=(-(-n // per_shard),), dtype="bool", chunks=(1,), fill_value=False)
        if layout.image_level:
            continue
        if split == "train":
            if layout.stored_statistics:
                _create(sub, "gram", (n, c, c), "float64", per_shard, layout, per_image_chunks=False)
            _create(sub, "sums", (n, c), "float64", per_shard, layout, per_image_chunks=False)
        else:
            _create(sub, "masks", (n, *layout.mask_shape), "bool", per_shard, layout, per_image_chunks=False)
    return group


def pending_shards(group: zarr.Group, split: str) -> list[int]:
    """Indices of shards not yet marked done."""
    return [int(i) for i in np.flatnonzero(~group[split]["done"][:])]


def shard_size(group: zarr.Group, split: str) -> int:
    """Images per shard of ``split``."""
    return int(group[split]["features"].shards[0])


def finalize(partial: Path, final: Path) -> Path:
    """Mark the partial store complete and move it to ``final``; a previous store there is moved aside first and
    deleted only once the new one is in place."""
    group = zarr.open_group(partial, mode="r+")
    for split in SPLITS:
        if split in group and pending_shards(group, split):
            raise RuntimeError(f"store {partial} still has unwritten shards in {split}")
    group.attrs["complete"] = True
    final.parent.mkdir(parents=True, exist_ok=True)
    previous = partial.with_name(f"{partial.name}.previous")
    if final.exists():
        if previous.exists():
            remove_store(previous)
        if not _is_zarr_store(final):
            remove_store(final)  # raises: never replace something that is not a store
        os.replace(final, previous)
    os.replace(partial, final)
    if previous.exists():
        remove_store(previous)
    return final


def read_rows(array: Any, indices: np.ndarray) -> np.ndarray:
    """Rows ``indices`` of ``array`` (zarr or numpy) in ascending order, each run of consecutive rows read as
    one slice: zarr's orthogonal indexing of integer arrays over sharded chunks costs seconds and hundreds of
    MB per 11 MB image, a slice costs what it reads."""
    order = np.sort(np.asarray(indices, dtype=np.int64))
    if isinstance(array, np.ndarray):
        return array[order]
    breaks = np.flatnonzero(np.diff(order) != 1) + 1
    runs = np.split(order, breaks)
    parts = [np.asarray(array[int(run[0]):int(run[-1]) + 1]) for run in runs if len(run)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


class RowSubset:
    """Rows ``rows`` (ascending) of a zarr or numpy array, read on demand: what the trainers and scorers read when
    part of a split is held out (they see an array of ``len(rows)`` images)."""

    def __init__(self, array: Any, rows: np.ndarray) -> None:
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), *array.shape[1:])
        self.dtype = array.dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return read_rows(self.array, self.rows[rows])


class CachedRows:
    """Some rows of a store's split held in memory, read through the store's interface: what a learning curve
    scores at every checkpoint is read from disk once. Every other read goes to the store."""

    def __init__(self, store: FeatureStore, rows: np.ndarray, split: str = "test") -> None:
        self.store, self.split = store, split
        self.rows = np.asarray(rows, dtype=np.int64)
        self.held = read_rows(store.features(split), self.rows)
        self.held_masks = read_rows(store.group[f"{split}/masks"], self.rows) if split == "test" else None

    @staticmethod
    def nbytes(store: FeatureStore, rows: int, split: str = "test") -> int:
        """Bytes ``rows`` images of ``store``'s split take when held (features as stored, masks)."""
        array = store.features(split)
        masks = int(np.prod(store.geometry.size)) if split == "test" else 0
        return rows * (int(np.prod(array.shape[1:])) * array.dtype.itemsize + masks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def chunks(self, split: str, size: int, rows: np.ndarray | None = None,
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """As :meth:`FeatureStore.chunks`, from memory when ``rows`` are the held ones."""
        if split != self.split or rows is None or not np.array_equal(rows, self.rows):
            yield from self.store.chunks(split, size, rows)
            return
        for start in range(0, len(self.rows), size):
            yield self.rows[start:start + size], self.held[start:start + size]

    def masks(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """As :meth:`FeatureStore.masks`, from memory for held rows."""
        if self.held_masks is None or isinstance(rows, slice) or not np.isin(rows, self.rows).all():
            return self.store.masks(rows)
        return self.held_masks[np.searchsorted(self.rows, rows)]


class FeatureStore:
    """Read access to one complete category store."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise MissingOutputError(f"no feature store at {self.path}: run the extract stage (dvc repro extract)")
        self.group = zarr.open_group(self.path, mode="r")
        if not self.group.attrs.get("complete", False):
            raise MissingOutputError(f"feature store {self.path} is incomplete; rerun the extract stage")

    @property
    def attrs(self) -> dict[str, Any]:
        """The store's attributes (spec, fingerprint, backbone ...)."""
        return dict(self.group.attrs)

    @property
    def geometry(self) -> Geometry:
        """The model input geometry the features were extracted at (maps and masks have its ``size``)."""
        return Geometry.from_record(self.group.attrs["geometry"], f"{self.path} geometry")

    @property
    def channels(self) -> int:
        """Feature channels C."""
        return int(self.group["train/features"].shape[1])

    @property
    def pixels_per_image(self) -> int:
        """Feature positions per image (H * W)."""
        shape = self.group["train/features"].shape
        return int(shape[2] * shape[3])

    def samples(self, split: str) -> list[Sample]:
        """Per-image metadata of ``split``."""
        return [Sample.from_record(r) for r in self.group[split].attrs["samples"]]

    @property
    def has_masks(self) -> bool:
        """Whether every defective test image has a mask (pixel metrics); else the category is image-level."""
        return all(s.mask_path is not None for s in self.samples("test") if s.label == 1)

    def features(self, split: str) -> zarr.Array:
        """The (N, C, H, W) feature array of ``split`` (lazy)."""
        return self.group[split]["features"]

    def batches(self, split: str, size: int | None = None):
        """Yield consecutive (indices, features) blocks, one shard at a time by default."""
        array = self.features(split)
        size = size or int(array.shards[0])
        for start in range(0, array.shape[0], size):
            stop = min(start + size, array.shape[0])
            yield np.arange(start, stop), array[start:stop]

    @property
    def has_stored_statistics(self) -> bool:
        """Whether per-image Gram matrices were stored at extraction (``train.statistics`` stored)."""
        return "gram" in self.group["train"]

    def gram_stats(self, memory_bytes: float = float("inf"), rows: np.ndarray | None = None,
                   ) -> tuple[np.ndarray | zarr.Array | RowSubset, np.ndarray]:
        """Per-image Gram matrices (N, C, C) and sums (N, C) of the training split (only ``rows``, ascending, when
        given); the Gram matrices stay on disk (read on demand) when they would take more than ``memory_bytes``."""
        gram, sums = self.group["train/gram"], self.group["train/sums"][:]
        if rows is not None:
            gram, sums = RowSubset(gram, rows), sums[rows]
        in_memory = int(np.prod(gram.shape)) * 8 <= memory_bytes
        return (gram[:] if in_memory else gram), sums

    def gram_total(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Sum of the training images' Gram matrices (C, C) (only ``rows`` when given), a shard at a time."""
        gram = self.group["train/gram"]
        size = int(gram.chunks[0])
        if rows is not None:
            gram = RowSubset(gram, rows)
        total = np.zeros(gram.shape[1:], dtype=np.float64)
        for start in range(0, gram.shape[0], size):
            total += gram[start:start + size].sum(0)
        return total

    def feature_mean(self) -> np.ndarray:
        """Mean pre-trained training feature (C,), from the cached sums."""
        sums = self.group["train/sums"][:]
        return sums.sum(0) / (len(sums) * self.pixels_per_image)

    def centers(self, distributions: tuple[str, ...], norm: float, seed: int) -> dict[str, torch.Tensor]:
        """The center of each distribution at ``norm`` for this store's features: the one function every stage
        uses to draw a variant's center (the mean training feature is read only for ``feature_mean``)."""
        return {d: make_center(d, norm, self.channels, seed, feature_mean=self.feature_mean) for d in distributions}

    def check_trained_on(self, fingerprint: str, model: str) -> None:
        """Fail when ``model`` (a trained projector, by name) was trained on other features than this store's."""
        if fingerprint != self.attrs.get("fingerprint"):
            raise ModelError(f"{model} was trained on other features than {self.path} holds now; rerun the train "
                             "stage (dvc repro)")

    def masks(self, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Test masks (N, H, W) bool at the model input's size, of the images ``rows`` (a slice or ascending
        indices) only if given."""
        if isinstance(rows, slice):
            return self.group["test/masks"][rows]
        return read_rows(self.group["test/masks"], rows)

    def chunks(self, split: str, size: int, rows: np.ndarray | None = None,
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (indices, features) blocks of at most ``size`` images: consecutive ones, or of ``rows`` only
        (ascending and unique) when given."""
        if rows is None:
            yield from self.batches(split, size)
            return
        rows = np.asarray(rows, dtype=np.int64)
        if np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be ascending and unique (they are read, and returned, in that order)")
        array = self.features(split)
        for start in range(0, len(rows), size):
            chunk = np.asarray(rows[start:start + size], dtype=np.int64)
            yield chunk, read_rows(array, chunk)
