"""Learning curves: the test split scored at checkpoints while a projector trains (Protocol C, training budget)."""

from __future__ import annotations

import copy
import os

import numpy as np
import torch

from polarocc.config import ScoreConfig
from polarocc.detector.stores import pixel_accumulators, score_store
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.scoring.metrics import image_auroc
from polarocc.scoring.pixel_metrics import PixelMetrics
from polarocc.training.threads import torch_threads


def checkpoints(n_images: int) -> list[int]:
    """Images seen at which the learning curve is evaluated: 1, 2, 4, ... and ``n_images``."""
    marks = [1 << k for k in range(max(n_images, 1).bit_length()) if 1 << k < n_images]
    return [*marks, n_images]


class LearningCurve:
    """Scores the test split at checkpoints during training; the projector itself is never touched."""

    def __init__(self, store: FeatureStore, center: torch.Tensor, cfg: ScoreConfig, marks: list[int],
                 device: str = "cpu") -> None:
        self.store, self.center, self.cfg, self.device = store, center, cfg, device
        self.marks = set(marks)
        self.labels = np.array([s.label for s in store.samples("test")])
        self.points: dict[int, dict[str, float]] = {}
        self.final: tuple[np.ndarray, PixelMetrics] | None = None

    def evaluate(self, projector: Projector) -> tuple[dict[str, float], tuple[np.ndarray, PixelMetrics]]:
        """Test image and pixel ROC AUC of a copy of ``projector``, and its (image scores, pixel accumulator)
        for the other pixel metrics, computed only when asked for."""
        # Scored as the saved model is (float32, see save_model) and on every core: the training loop may hold
        # one float64 thread, which made these evaluations 4x slower than the score stage's.
        frozen = copy.deepcopy(projector).requires_grad_(False).float()
        [pixel] = pixel_accumulators(self.store, 1, self.cfg)
        with torch_threads(os.cpu_count() or 1):
            [scores] = score_store(self.store, [(frozen, self.center)], self.cfg, self.device, pixel=[pixel])
        metrics = {"image_auroc": image_auroc(self.labels, scores), "pixel_auroc": pixel.pixel_auroc()}
        return metrics, (scores, pixel)

    def __call__(self, distribution: str, seen: int, projector: Projector) -> None:
        if seen in self.marks:
            self.points[seen], outputs = self.evaluate(projector)
            if seen == max(self.marks):
                self.final = outputs
