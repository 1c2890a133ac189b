"""Pixel metrics (ROC AUC, AUPRO, F1-max) fed one batch of anomaly maps at a time.

Two accumulators share one interface. :class:`ExactPixelMetrics` keeps every map and mask and calls the
exact functions of :mod:`polarocc.scoring.metrics`; its memory grows with the test set.
:class:`BinnedPixelMetrics` keeps three fixed-size histograms over an order-preserving 20-bit key of the
float32 score (sign, exponent and 11 mantissa bits: bins 2^-11 of the value wide), so its memory does
not grow with the test set. Pixels of different bins are ordered exactly; only pixels that share a
bin are treated as tied, and the AUROC it reports carries the largest error those ties can cause.
:func:`pixel_metrics_for` picks the exact one while its arrays fit the memory budget.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from polarocc.errors import DataError
from polarocc.scoring.metrics import _area_up_to, aupro, connected_regions, pixel_auroc, pixel_auroc_and_f1_max

KEY_BITS = 20
EXACT_BYTES_KEPT = 4 + 1 + 4  # per pixel and model: float32 map, bool mask, int32 region id
EXACT_BYTES_COMPUTING = 72  # per pixel, while one model's metrics are computed (sort orders, copies; measured 69)


class PixelMetrics(Protocol):
    """What the score stages feed maps to and read pixel metrics from."""

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Add (B, H, W) anomaly maps with their (B, H, W) defect masks."""

    def pixel_auroc(self) -> float:
        """Pixel ROC AUC alone (learning curves need no more)."""

    def result(self) -> dict[str, float | str]:
        """``pixel_auroc``, ``aupro`` (FPR <= 0.3), ``pixel_f1_max`` and how they were computed."""


def _check_batch(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks, dtype=bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (batch, height, width)")
    if not np.isfinite(maps).all():
        raise FloatingPointError("anomaly maps contain NaN or Inf")
    return maps, masks


class ExactPixelMetrics:
    """Keeps every map, mask and defect region (9 bytes per test pixel); exact metrics."""

    def __init__(self, fpr_limit: float = 0.3) -> None:
        self.fpr_limit = fpr_limit
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        self.regions: list[np.ndarray] = []
        self.region_count = 0

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        maps, masks = _check_batch(maps, masks)
        regions = connected_regions(masks)
        # Kept flat: every metric reads the pixels as one list, and images of different sizes can then be added.
        self.regions.append(np.where(regions > 0, regions + self.region_count, 0).astype(np.int32).ravel())
        self.region_count += int(regions.max(initial=0))
        self.maps.append(maps.ravel())
        self.masks.append(masks.ravel())

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.maps:
            raise DataError("no anomaly maps were added")
        return np.concatenate(self.maps), np.concatenate(self.masks)

    def pixel_auroc(self) -> float:
        maps, masks = self._arrays()
        return pixel_auroc(masks, maps)

    def result(self) -> dict[str, float | str]:
        maps, masks = self._arrays()
        auroc, f1 = pixel_auroc_and_f1_max(masks, maps)
        return {
            "pixel_auroc": auroc,
            "aupro": aupro(masks, maps, self.fpr_limit, regions=np.concatenate(self.regions)),
            "pixel_f1_max": f1,
            "pixel_metrics": "exact",
        }


def order_key(values: np.ndarray, bits: int = KEY_BITS) -> np.ndarray:
    """The top ``bits`` bits of an unsigned integer that orders float32 ``values`` like the floats."""
    raw = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (raw >> 31).astype(bool)
    ordered = np.where(negative, ~raw, raw | np.uint32(0x80000000))
    return (ordered >> np.uint32(32 - bits)).astype(np.int64)


class BinnedPixelMetrics:
    """Histograms of defect and defect-free pixels over :func:`order_key` bins (memory: 24 MiB at 20 bits).

    AUPRO needs no per-region state: a pixel of a region of size ``|r|`` adds ``1 / |r|`` to its bin's
    overlap mass, so the mean per-region overlap above a threshold is that mass summed above it over the
    number of regions. Regions are connected components within one image, so each batch labels its own.
    """

    def __init__(self, fpr_limit: float = 0.3, bits: int = KEY_BITS) -> None:
        self.fpr_limit, self.bits = fpr_limit, bits
        size = 1 << bits
        self.normal = np.zeros(size, dtype=np.int64)
        self.defect = np.zeros(size, dtype=np.int64)
        self.overlap = np.zeros(size, dtype=np.float64)
        self.region_count = 0

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        maps, masks = _check_batch(maps, masks)
        keys = order_key(maps, self.bits)
        size = self.normal.size
        self.normal += np.bincount(keys[~masks], minlength=size)
        self.defect += np.bincount(keys[masks], minlength=size)
        regions = connected_regions(masks)
        if regions.max(initial=0):
            region_sizes = np.bincount(regions.ravel()).astype(np.float64)
            inside = regions > 0
            self.overlap += np.bincount(keys[inside], weights=1.0 / region_sizes[regions[inside]], minlength=size)
            self.region_count += region_sizes.size - 1

    def _counts(self) -> tuple[int, int]:
        n_normal, n_defect = int(self.normal.sum()), int(self.defect.sum())
        if not n_normal or not n_defect:
            raise DataError("pixel metrics need both normal and defective pixels in the test masks")
        return n_normal, n_defect

    def _auroc_and_tie_bound(self) -> tuple[float, float]:
        n_normal, n_defect = self._counts()
        normal, defect = self.normal[::-1], self.defect[::-1]  # from the highest score down
        defect_above = np.cumsum(defect) - defect
        pairs = float(n_normal) * n_defect
        auroc = float((normal * (defect_above + 0.5 * defect)).sum() / pairs)
        return auroc, float(0.5 * (normal * defect.astype(np.float64)).sum() / pairs)

    def pixel_auroc(self) -> float:
        return self._auroc_and_tie_bound()[0]

    def result(self) -> dict[str, float | str]:
        n_normal, n_defect = self._counts()
        auroc, tie_bound = self._auroc_and_tie_bound()
        # Bins from the highest score down: predicting "anomalous" at or above each bin's lower edge.
        normal, defect, overlap = self.normal[::-1], self.defect[::-1], self.overlap[::-1]
        true_pos = np.cumsum(defect)
        predicted = true_pos + np.cumsum(normal)
        f1 = float((2 * true_pos / (predicted + n_defect)).max())
        fpr = np.r_[0.0, np.cumsum(normal) / n_normal]
        pro = np.r_[0.0, np.cumsum(overlap) / self.region_count]
        return {
            "pixel_auroc": auroc,
            "aupro": _area_up_to(fpr, pro, self.fpr_limit) / self.fpr_limit,
            "pixel_f1_max": f1,
            "pixel_metrics": f"binned ({self.bits}-bit score keys)",
            "pixel_auroc_tie_bound": tie_bound,
        }


class ImageLevelOnly:
    """The accumulator of a test split whose defects lack masks: it keeps nothing and every pixel metric is None
    (the results' pixel columns stay empty), so the image-level metrics are computed as for any dataset."""

    def add(self, maps: np.ndarray, masks: np.ndarray) -> None:
        """Nothing to compare the maps with."""

    def pixel_auroc(self) -> None:
        return None

    def result(self) -> dict[str, float | str | None]:
        return {"pixel_auroc": None, "aupro": None, "pixel_f1_max": None, "pixel_metrics": "none (no masks)"}


def pixel_metrics_for(test_pixels: int, models: int, memory_mb: float, masks: bool = True) -> list[PixelMetrics]:
    """One accumulator per model: exact while every model's kept arrays, plus the working memory of computing
    one model's metrics, fit ``memory_mb``; else binned; :class:`ImageLevelOnly` without ``masks``."""
    if not masks:
        return [ImageLevelOnly() for _ in range(models)]
    if test_pixels * (models * EXACT_BYTES_KEPT + EXACT_BYTES_COMPUTING) <= memory_mb * 2 ** 20:
        return [ExactPixelMetrics() for _ in range(models)]
    return [BinnedPixelMetrics() for _ in range(models)]


def results_of(accumulators: list[PixelMetrics], test_pixels: int, memory_mb: float) -> list[dict[str, float | str]]:
    """``result()`` of every accumulator, in order. Exact ones are computed side by side, one per core (numpy's
    sorts release the GIL), as far as their working memory fits ``memory_mb`` beside the kept arrays."""
    workers = result_workers(sum(isinstance(a, ExactPixelMetrics) for a in accumulators), len(accumulators),
                             test_pixels, memory_mb)
    if workers <= 1:
        return [a.result() for a in accumulators]
    with ThreadPoolExecutor(workers, thread_name_prefix="polarocc-metrics") as pool:
        return list(pool.map(lambda a: a.result(), accumulators))


def result_workers(exact: int, models: int, test_pixels: int, memory_mb: float) -> int:
    """How many of ``models`` accumulators (``exact`` of them exact) :func:`results_of` computes at once: one per
    core, as far as each one's working memory fits ``memory_mb`` beside the kept arrays."""
    spare = memory_mb * 2 ** 20 - test_pixels * exact * EXACT_BYTES_KEPT
    fit = max(1, int(spare // max(1, test_pixels * EXACT_BYTES_COMPUTING)))
    return max(1, min(os.cpu_count() or 1, models, fit))
