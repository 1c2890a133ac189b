"""Decision thresholds on image scores: explicit, never chosen on test labels."""

from __future__ import annotations

import numpy as np

from polarocc.detector.artefact import Threshold
from polarocc.errors import ConfigError, DataError


def quantile_threshold(normal_scores: np.ndarray | list[float], quantile: float) -> Threshold:
    """The ``quantile`` of normal image scores (an observed score, numpy's 'higher' method).

    Scores of the images the projector was trained on are lower than those of unseen normal images, so a
    quantile below 1 flags some unseen normal images; that is the price of needing no labelled anomalies.
    """
    scores = np.asarray(normal_scores, dtype=np.float64)
    if not 0 < quantile <= 1:
        raise ConfigError(f"threshold quantile must be in (0, 1], got {quantile}")
    if scores.size == 0:
        raise ConfigError("a quantile threshold needs normal scores; give --threshold explicitly")
    return Threshold(float(np.quantile(scores, quantile, method="higher")), "quantile", float(quantile))


def holdout_quantile_threshold(held_out_scores: np.ndarray | list[float], quantile: float) -> Threshold:
    """The ``quantile`` of the scores of normal images held out of training: unlike training images' scores,
    these are what unseen normal images score, so about ``1 - quantile`` of new normal images exceed it."""
    value = quantile_threshold(held_out_scores, quantile).value
    return Threshold(value, "holdout_quantile", float(quantile), window=len(held_out_scores))


def stream_quantile_threshold(window: list[float], quantile: float, carried: int = 0) -> Threshold:
    """The ``quantile`` of the scores in a stream's window (prequential scores of the images it learned from;
    the oldest ``carried`` of them carried over from the starting model's normal scores)."""
    value = quantile_threshold(window, quantile).value
    return Threshold(value, "stream_quantile", float(quantile), window=len(window), carried=int(carried))


def held_out_rows(n_images: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the normal images held out of training to calibrate the threshold: ``fraction`` of
    ``n_images`` (at least one when ``fraction`` > 0, none for 0), drawn with ``seed``."""
    if fraction == 0:
        return np.zeros(0, dtype=np.int64)
    count = max(1, round(fraction * n_images))
    if n_images - count < 1:
        raise DataError(f"{n_images} normal image(s): holding out {count} for the threshold leaves none to train on; "
                        "give more normal images or a holdout of 0")
    return np.sort(np.random.default_rng(seed).permutation(n_images)[:count])


def radius_threshold(radius: float, squared: bool) -> Threshold:
    """The paper's rule d > R (R = 1e-5): on the score scale, R^2 for squared maps, else R.

    Training never brings every normal pixel within R of the center, so every image lies above it: usable
    to reproduce the paper's definition, not to make decisions.
    """
    return Threshold(float(radius) ** 2 if squared else float(radius), "radius")


def user_threshold(value: float) -> Threshold:
    """A threshold the user gives on the score scale."""
    if not np.isfinite(value):
        raise ConfigError(f"threshold must be a finite number, got {value}")
    return Threshold(float(value), "user")
