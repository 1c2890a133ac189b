"""Training statistics of a minibatch: G = sum_p f_p f_p^T, s = sum_p f_p and the pixel count n.

Two sources give the same numbers:

- ``stored``: per-image G and s written at extraction (``train/gram``, ``train/sums``), summed per batch.
  A step then never touches pixels, but each image costs C x C float64 on disk (25.7 MB at 1792 channels,
  2.3x its float16 features).
- ``streamed``: nothing per image is stored; every epoch reads the training features once and forms each
  batch's G on the compute device (2 x pixels x C^2 FLOP per image, a fraction of a millisecond on a GPU).

``auto`` stores the statistics only when they cost at most half the bytes of the training features
(Lite0's 176 channels: stored; Wide-ResNet50's 1792: streamed).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch

from polarocc.features.store import read_rows
from polarocc.memory import release_free_memory

STREAM_BLOCK_BYTES = 256 * 2 ** 20  # float64 pixels converted at once when forming a streamed Gram


class BatchStatistics(Protocol):
    """What the statistics trainer reads per step."""

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G (C, C), s (C,), pixel count) of the training images ``indices``."""

    def plan(self, batches: list[np.ndarray]) -> None:
        """The batches that will be asked for next, in order (lets a source read ahead)."""


class StoredStatistics:
    """Batch sums of per-image statistics: tensors in memory, or zarr arrays read one batch at a time."""

    def __init__(self, gram: Any, sums: np.ndarray, pixels_per_image: int, dtype: torch.dtype,
                 device: str = "cpu") -> None:
        self.in_memory = isinstance(gram, np.ndarray)
        self.gram = torch.as_tensor(gram, dtype=dtype).to(device) if self.in_memory else gram
        self.sums = torch.as_tensor(np.asarray(sums), dtype=dtype).to(device)
        self.pixels_per_image, self.dtype, self.device = pixels_per_image, dtype, device

    def plan(self, batches: list[np.ndarray]) -> None:
        """Nothing to read ahead: a batch is a few C x C matrices."""

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Rows are added in batch order from memory or disk alike, so both give the same bits."""
        if self.in_memory:
            rows = {int(i): self.gram[int(i)] for i in indices}
        else:
            order = np.sort(indices)
            block = torch.as_tensor(read_rows(self.gram, order), dtype=self.dtype).to(self.device)
            rows = {int(i): block[k] for k, i in enumerate(order)}
        # Accumulate in place: stacking the batch's C x C matrices first would copy them.
        total = rows[int(indices[0])].clone()
        s = self.sums[int(indices[0])].clone()
        for i in indices[1:]:
            total += rows[int(i)]
            s += self.sums[int(i)]
        return total, s, len(indices) * self.pixels_per_image


def _torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a numpy/zarr dtype."""
    return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype


def gram_of(features: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_p f_p f_p^T (C, C) and sum_p f_p (C,) over every image and position of ``features`` (B, C, H, W),
    computed in ``dtype`` on the features' device, a few images at a time so the converted copy stays small."""
    b, c = features.shape[:2]
    per_image = c * features[0, 0].numel() * torch.finfo(dtype).bits // 8
    step = max(1, STREAM_BLOCK_BYTES // max(per_image, 1))
    gram = torch.zeros(c, c, dtype=dtype, device=features.device)
    sums = torch.zeros(c, dtype=dtype, device=features.device)
    for start in range(0, b, step):
        flat = features[start:start + step].to(dtype).transpose(0, 1).reshape(c, -1)
        gram.addmm_(flat, flat.T)
        sums += flat.sum(1)
    return gram, sums


TRIM_BYTES = 64 * 2 ** 20  # batches at least this large give their freed memory back (ms per batch, see memory.py)


class StreamedStatistics:
    """Batch statistics formed from the stored features on the compute device; the next batch is read
    (and decompressed) in a thread while the current one trains.

    When the whole training split's features fit ``memory_bytes`` they are read once and kept on the device
    (the first epoch reads them as it goes), so later epochs touch neither the disk nor the decompressor; the
    statistics are the same bits either way.
    """

    def __init__(self, features: Any, dtype: torch.dtype, device: str = "cpu", memory_bytes: float = 0) -> None:
        self.features = features  # (N, C, H, W) zarr array or numpy array
        self.pixels_per_image = int(np.prod(features.shape[2:]))
        self.dtype, self.device = dtype, device
        self._reader = ThreadPoolExecutor(max_workers=1)
        self._queue: list[tuple[np.ndarray, Any]] = []
        self.images_read = 0
        self._epoch_gram: torch.Tensor | None = None  # sum of the first epoch's batch Grams: every image once
        nbytes = int(np.prod(features.shape)) * np.dtype(features.dtype).itemsize
        self._kept: torch.Tensor | None = None
        self._kept_rows: np.ndarray | None = None
        if nbytes <= memory_bytes:
            self._kept = torch.empty(tuple(features.shape), dtype=_torch_dtype(features.dtype), device=device)
            self._kept_rows = np.zeros(features.shape[0], dtype=bool)

    @property
    def keeps_features(self) -> bool:
        """Whether the features stay on the device after their first read."""
        return self._kept is not None

    def _read(self, indices: np.ndarray) -> np.ndarray:
        return read_rows(self.features, indices)

    def _block(self, indices: np.ndarray, pending: Any) -> torch.Tensor:
        """The batch's features (sorted image order) on the device."""
        order = np.sort(indices)
        if self._kept is not None and self._kept_rows[order].all():
            return self._kept[torch.as_tensor(order)]
        block = pending.result() if pending is not None else self._read(indices)
        features = torch.from_numpy(np.ascontiguousarray(block)).to(self.device, non_blocking=True)
        if self._kept is not None:
            self._kept[torch.as_tensor(order)] = features
            self._kept_rows[order] = True
        return features

    def plan(self, batches: list[np.ndarray]) -> None:
        """Queue ``batches``; the first one starts reading now."""
        self._queue = [(b, None) for b in batches]
        self._prefetch(0)

    def _prefetch(self, position: int) -> None:
        if position < len(self._queue) and self._queue[position][1] is None:
            indices = self._queue[position][0]
            if self._kept is not None and self._kept_rows[indices].all():
                return
            self._queue[position] = (indices, self._reader.submit(self._read, indices))

    def batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The batch's statistics; reads the following planned batch in the background meanwhile."""
        pending = None
        if self._queue and np.array_equal(self._queue[0][0], indices):
            _, pending = self._queue.pop(0)
        else:
            self._queue = []
        self._prefetch(0)
        block = self._block(indices, pending)
        gram, sums = gram_of(block, self.dtype)
        if block.nbytes >= TRIM_BYTES and block.device.type == "cpu":
            del block
            release_free_memory()  # else the allocator keeps freed batches and the RSS creeps up with N
        if self.images_read < self.features.shape[0]:
            self._epoch_gram = gram.clone() if self._epoch_gram is None else self._epoch_gram.add_(gram)
        self.images_read += len(indices)
        return gram, sums, len(indices) * self.pixels_per_image

    def epoch_gram(self) -> torch.Tensor:
        """The Gram matrix summed over the whole training split, from the first epoch's batches (each image
        once), so the radius certificate needs no extra pass to form it."""
        if self._epoch_gram is None or self.images_read < self.features.shape[0]:
            raise RuntimeError("the summed Gram matrix is known after one whole epoch")
        return self._epoch_gram

    def close(self) -> None:
        """Stop the reader thread."""
        self._reader.shutdown(wait=True, cancel_futures=True)
