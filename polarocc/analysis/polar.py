"""Polar diagnostics (paper Fig. 2): where projected features lie in radius and angle around the center.

For normal and anomalous test features: the radius ``||z||``, the angle between ``z`` and ``c``, and the
mean pairwise cosine similarity between normal and anomalous features. The mean pairwise cosine of two
sets equals the dot product of their mean unit vectors, so it needs one pass and no pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from polarocc.features.store import FeatureStore
from polarocc.sampling import Reservoir

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
IGNORED, NORMAL, ANOMALOUS = 0, 1, 2


def position_labels(masks: np.ndarray, image_labels: np.ndarray, height: int, width: int) -> torch.Tensor:
    """Label each feature position: normal (every position of a defect-free image), anomalous (a position
    of a defective image whose patch is mostly defect) or ignored (the defect's fringe and its surroundings)."""
    coverage = F.adaptive_avg_pool2d(torch.as_tensor(masks, dtype=torch.float32)[:, None], (height, width))[:, 0]
    labels = torch.full(coverage.shape, IGNORED, dtype=torch.int8)
    labels[torch.as_tensor(np.asarray(image_labels) == 0)] = NORMAL
    labels[coverage > 0.5] = ANOMALOUS
    return labels


def store_position_labels(store: FeatureStore, rows: slice = slice(None),
                          image_labels: np.ndarray | None = None) -> torch.Tensor:
    """:func:`position_labels` of a store's test images ``rows`` at its feature resolution, reading the
    full-size masks one shard at a time. ``image_labels`` (every test image's 0/1 label) saves reading the
    sample list again when the caller asks chunk after chunk."""
    shape = store.features("test").shape
    if image_labels is None:
        image_labels = np.array([s.label for s in store.samples("test")])
    start, stop, _ = rows.indices(shape[0])
    step = int(store.features("test").shards[0])
    return torch.cat([position_labels(store.masks(slice(i, min(i + step, stop))), image_labels[i:min(i + step, stop)],
                                      shape[2], shape[3]) for i in range(start, stop, step)])


class PolarAccumulator:
    """Collects radius, angle and mean unit vectors of normal and anomalous vectors, batch by batch.

    Quantiles come from at most ``sample_limit`` (radius, angle) pairs per kind, a seeded uniform sample:
    every pair while there are fewer, so memory stays bounded on large test sets.
    """

    def __init__(self, center: torch.Tensor | None = None, sample_limit: int = 2 ** 20, seed: int = 1024) -> None:
        self.center = None if center is None else center.detach().double().cpu()
        self.sample = {NORMAL: Reservoir(sample_limit, seed), ANOMALOUS: Reservoir(sample_limit, seed + 1)}
        self.unit_sum = {NORMAL: 0.0, ANOMALOUS: 0.0}
        self.count = {NORMAL: 0, ANOMALOUS: 0}

    def add(self, vectors: torch.Tensor, labels: torch.Tensor) -> None:
        """``vectors`` (B, C, h, w) with ``labels`` (B, h, w) of NORMAL / ANOMALOUS / IGNORED."""
        # Positions are selected before the float64 copy: the ignored ones (most of a defective image) never get one.
        flat = vectors.detach().permute(0, 2, 3, 1).reshape(-1, vectors.shape[1])
        labels = torch.as_tensor(labels).reshape(-1).to(flat.device)
        for kind in (NORMAL, ANOMALOUS):
            part = flat[labels == kind].double().cpu()
            if not len(part):
                continue
            radius = torch.linalg.vector_norm(part, dim=1)
            unit = part / radius.clamp_min(1e-300)[:, None]
            self.unit_sum[kind] = self.unit_sum[kind] + unit.sum(0)
            self.count[kind] += len(part)
            angle = torch.full_like(radius, float("nan"))
            if self.center is not None:
                cos = (unit @ (self.center / torch.linalg.vector_norm(self.center))).clamp(-1, 1)
                angle = torch.rad2deg(torch.arccos(cos))
            self.sample[kind].add(torch.stack([radius, angle], 1).float())

    def mean_unit(self, kind: int) -> torch.Tensor:
        """The mean unit vector of one kind."""
        if not self.count[kind]:
            raise ValueError("no vectors of this kind were added")
        return self.unit_sum[kind] / self.count[kind]

    def cross_cosine(self) -> float:
        """Mean cosine similarity over every (normal, anomalous) pair."""
        return float(self.mean_unit(NORMAL) @ self.mean_unit(ANOMALOUS))

    def summary(self) -> dict:
        """JSON-ready quantiles of radius (and angle) per kind, and the normal-anomalous cosine."""
        # A kind can be empty (no defect covers half of any feature cell): its entries are then None.
        both = self.count[NORMAL] and self.count[ANOMALOUS]
        out: dict = {"cosine_normal_anomalous": round(self.cross_cosine(), 6) if both else None}
        for kind, name in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
            rows = self.sample[kind].rows
            sample = np.zeros((0, 2)) if rows is None else rows.numpy()
            entry = {"count": self.count[kind], "radius": _quantiles(sample[:, 0])}
            if self.center is not None:
                entry["angle_deg"] = _quantiles(sample[:, 1])
            out[name] = entry
        return out


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    if not len(values):
        return {"mean": None, **{f"q{int(q * 100):02d}": None for q in QUANTILES}}
    qs = np.quantile(values, QUANTILES)
    return {"mean": round(float(values.mean()), 6), **{f"q{int(q * 100):02d}": round(float(v), 6)
                                                      for q, v in zip(QUANTILES, qs, strict=True)}}
