"""Detection and segmentation metrics (scikit-learn ROC AUC)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score

from polarocc.errors import DataError


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of image scores against 0/1 labels (1 = anomalous)."""
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        raise DataError("image AUROC needs both normal and anomalous test images")
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC as the Mann-Whitney rank statistic, ties counted one half.

    Equals ``sklearn.metrics.roc_auc_score`` (tested to 1e-12) at a fraction of its cost on millions of
    pixels, where sklearn's repeated label validation and stable sort dominate the score stage.
    """
    labels = np.asarray(labels, dtype=bool).ravel()
    scores = np.asarray(scores).ravel()
    order = np.argsort(scores)
    ranked, hits = scores[order], labels[order]
    starts = np.r_[0, np.flatnonzero(ranked[1:] != ranked[:-1]) + 1]
    ends = np.r_[starts[1:], ranked.size]
    positives_per_run = np.add.reduceat(hits.astype(np.int64), starts)
    rank_sum = float(((starts + ends + 1) / 2.0 * positives_per_run).sum())
    n_pos = int(hits.sum())
    n_neg = hits.size - n_pos
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """ROC AUC over every test pixel (normal images included), as in MVTec AD evaluations."""
    masks = np.asarray(masks, dtype=bool).ravel()
    maps = np.asarray(maps, dtype=np.float32).ravel()
    if masks.shape != maps.shape:
        raise ValueError(f"masks hold {masks.size} pixels but maps hold {maps.size}")
    if masks.all() or not masks.any():
        raise DataError("pixel AUROC needs both normal and defective pixels in the test masks")
    if not np.isfinite(maps).all():
        raise FloatingPointError("anomaly maps contain NaN or Inf")
    return rank_auroc(masks, maps)
