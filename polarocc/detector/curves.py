"""Learning curves: the test split scored at checkpoints while a projector trains (Protocol C, training budget)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from polarocc.config import ScoreConfig
from polarocc.detector.stores import pixel_accumulators, score_store
from polarocc.features.store import CachedRows, FeatureStore
from polarocc.models.projector import Projector
from polarocc.sampling import stratified_rows
from polarocc.scoring.metrics import image_auroc
from polarocc.scoring.pixel_metrics import PixelMetrics
from polarocc.training.threads import torch_threads


def checkpoints(n_images: int) -> list[int]:
    """Images seen at which the learning curve is evaluated: 1, 2, 4, ... and ``n_images``."""
    marks = [1 << k for k in range(max(n_images, 1).bit_length()) if 1 << k < n_images]
    return [*marks, n_images]


CACHE_BYTES = 512 * 2 ** 20  # a curve's test sample is held in memory up to this size (100 Lite0 images: 110 MB)


class LearningCurve:
    """Scores the test split at checkpoints during training; the projector itself is never touched.

    Every checkpoint scores the same fixed, seeded sample of about ``sample_images`` test images, stratified by
    defect type (0 or a smaller split: the whole split), so the curve compares like with like and a long curve on
    a large split costs one full scoring, not one per checkpoint; the last checkpoint also scores the whole split
    (``final``, the reported result) unless ``whole_split_at_end`` is False. Every point records how many images
    it scored."""

    def __init__(self, store: FeatureStore, center: torch.Tensor, cfg: ScoreConfig, marks: list[int],
                 device: str = "cpu", sample_images: int = 0, seed: int = 1024, whole_split_at_end: bool = True,
                 ) -> None:
        self.store, self.center, self.cfg, self.device = store, center, cfg, device
        self.marks = set(marks)
        samples = store.samples("test")
        self.labels = np.array([s.label for s in samples])
        self.sample = stratified_rows([s.defect_type for s in samples], sample_images, seed)
        # The sample is scored at every checkpoint: held in memory when small, read once.
        small = CachedRows.nbytes(store, len(self.sample)) <= CACHE_BYTES
        self.source = CachedRows(store, self.sample) if len(self.sample) < len(samples) and small else store
        self.whole_split_at_end = whole_split_at_end
        self.points: dict[int, dict[str, float]] = {}
        self.final: tuple[np.ndarray, PixelMetrics] | None = None

    def evaluate(self, projector: Projector, rows: np.ndarray | None = None,
                 ) -> tuple[dict[str, float], tuple[np.ndarray, PixelMetrics]]:
        """Test image and pixel ROC AUC of a copy of ``projector`` (on the test images ``rows`` only, when given),
        and its (image scores, pixel accumulator) for the other pixel metrics, computed only when asked for."""
        # Scored as the saved model is (float32, see save_model) and on every core: the training loop may hold
        # one float64 thread, which made these evaluations 4x slower than the score stage's.
        frozen = copy.deepcopy(projector).requires_grad_(False).float()
        [pixel] = pixel_accumulators(self.store, 1, self.cfg)
        whole = rows is None or len(rows) == len(self.labels)
        with torch_threads(os.cpu_count() or 1):
            # CachedRows serves the held sample from memory and every other read from the store.
            [scores] = score_store(self.source, [(frozen, self.center)], self.cfg, self.device, pixel=[pixel],
                                   rows=None if whole else rows)
        labels = self.labels if whole else self.labels[rows]
        metrics = {"image_auroc": image_auroc(labels, scores), "pixel_auroc": pixel.pixel_auroc(),
                   "test_images": len(labels)}
        return metrics, (scores, pixel)

    def __call__(self, distribution: str, seen: int, projector: Projector) -> None:
        if seen in self.marks:
            sampled = len(self.sample) < len(self.labels)
            self.points[seen], outputs = self.evaluate(projector, self.sample if sampled else None)
            if seen == max(self.marks) and self.whole_split_at_end:
                self.final = self.evaluate(projector)[1] if sampled else outputs
