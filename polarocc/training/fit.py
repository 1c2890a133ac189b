"""Fit the projectors of several center variants on one set of training features: the method's training, used by
the pipeline (features cached in a store) and by :class:`polarocc.Detector` (features in memory) alike.

Every variant trains in lockstep from the same batch statistics (:func:`train_lockstep`). The statistics
shortcut is exact only while no training pixel lies within R of the center: the final models are checked on
every training pixel in one shared pass (:func:`certified_min_distance_sq`), and a model that fails is retrained
with the direct trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from polarocc.config import TrainConfig
from polarocc.errors import NumericalError
from polarocc.features.budget import STORED, STREAMED
from polarocc.features.store import read_rows
from polarocc.models.projector import Projector
from polarocc.training.certify import certified_min_distance_sq
from polarocc.training.direct import train_direct
from polarocc.training.gram import VariantDiverged, train_lockstep
from polarocc.training.schedule import TrainHistory
from polarocc.training.statistics import StoredStatistics, StreamedStatistics
from polarocc.training.threads import threads_for, torch_threads

DTYPES = {"float32": torch.float32, "float64": torch.float64}

Fitted = tuple[Projector, torch.Tensor, TrainHistory]


@dataclass
class TrainingFeatures:
    """One category's training features and what the trainers read of them.

    ``features`` is (N, C, H, W), a zarr or numpy array; ``sums`` the per-image feature sums (N, C) in float64;
    ``blocks`` yields every image's features once, a few images at a time (the certificate's pass); ``stored``
    gives the per-image Gram matrices and sums within a memory budget in bytes, when extraction stored them,
    and ``gram_total`` their sum over the split. ``name`` names the features in warnings and errors.
    """

    features: Any
    sums: np.ndarray
    blocks: Callable[[], Iterable[np.ndarray]]
    name: str
    stored: Callable[[float], tuple[Any, np.ndarray]] | None = None
    gram_total: Callable[[], np.ndarray] | None = None

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    @property
    def pixels_per_image(self) -> int:
        return int(np.prod(self.features.shape[2:]))

    @classmethod
    def in_memory(cls, features: np.ndarray, name: str, block: int = 16) -> TrainingFeatures:
        """Features held in memory (no stored statistics: batches form their Gram matrices as they come)."""
        flat = torch.from_numpy(np.ascontiguousarray(features)).flatten(2)
        sums = torch.sum(flat, -1, dtype=torch.float64).numpy()  # exact for float16 inputs, as extraction's
        return cls(features, sums, lambda: (features[i:i + block] for i in range(0, len(features), block)), name)


def step_flop(channels: int, pixels_per_image: int, variants: int, cfg: TrainConfig, streamed: bool) -> float:
    """FLOP of one lockstep step: V products W G (2 C^3 each), plus forming G when streamed."""
    forming = 2.0 * cfg.batch_size * pixels_per_image * channels ** 2 if streamed else cfg.batch_size * channels ** 2
    return variants * 2.0 * channels ** 3 + forming


def fit_projectors(data: TrainingFeatures, centers: dict[str, torch.Tensor], cfg: TrainConfig, kind: str,
                   bias: bool, statistics: str = STREAMED, device: str = "cpu", threads: int | None = None,
                   on_step: Callable[[str, int, Projector], None] | None = None,
                   describe: Callable[[str], str] | None = None) -> dict[str, Fitted]:
    """Train one projector per center (keyed by its name) on ``data``; (projector, center, history) per name.

    ``statistics`` is ``stored`` or ``streamed`` (see :mod:`polarocc.training.statistics`; ``cfg.trainer ==
    'direct'`` uses neither). ``on_step(name, images_seen, projector)`` follows every step; after a retraining
    it starts again from the first step. ``threads`` (torch threads of the steps and the certificate) defaults to
    :func:`threads_for` the step's FLOP. ``describe(name)`` words a variant in errors (default: its name).
    """
    names = tuple(centers)
    dtype = DTYPES[cfg.dtype]
    n_images = int(data.features.shape[0])
    describe = describe or (lambda name: name)

    def fresh() -> Projector:
        return Projector(data.channels, kind, bias, seed=cfg.seed, dtype=dtype)

    def named(name: str, exc: FloatingPointError) -> NumericalError:
        return NumericalError(f"training {data.name} with {describe(name)}: {exc}. Models written before this one "
                              "are kept; lower the norm or the learning rate")

    def direct(name: str, note: str | None = None) -> Fitted:
        projector = fresh()
        observer = None if on_step is None else lambda seen: on_step(name, seen, projector)
        try:
            history = train_direct(projector, centers[name], lambda idx: read_rows(data.features, idx), n_images,
                                   cfg, device, on_step=observer)
        except FloatingPointError as exc:
            raise named(name, exc) from exc
        if note:
            history.notes.append(note)
        return projector, centers[name], history

    if cfg.trainer == "direct":
        return {name: direct(name) for name in names}
    streamed = statistics == STREAMED or data.stored is None
    if streamed:
        # On a GPU, re-reading and decompressing the features every epoch would dominate a step, so they stay
        # in device memory when they fit; on the CPU forming G dominates and the page cache serves re-reads,
        # so host memory stays bounded by a batch.
        keep = cfg.stats_memory_mb * 2 ** 20 if device != "cpu" else 0
        stats: StoredStatistics | StreamedStatistics = StreamedStatistics(data.features, dtype, device, keep)
    else:
        gram, sums = data.stored(cfg.stats_memory_mb * 2 ** 20)
        stats = StoredStatistics(gram, sums, data.pixels_per_image, dtype, device)
    projectors = [fresh() for _ in names]
    observer = None if on_step is None else lambda v, seen: on_step(names[v], seen, projectors[v])
    threads = threads or threads_for(step_flop(data.channels, data.pixels_per_image, len(names), cfg, streamed),
                                     device)
    try:
        with torch_threads(threads):
            histories, problems = train_lockstep(projectors, [centers[n] for n in names], stats, n_images, cfg,
                                                 observer, device)
    except VariantDiverged as exc:
        raise named(names[exc.index], exc) from exc
    finally:
        if streamed:
            stats.close()
    kind_note = f"statistics {STREAMED if streamed else STORED}"
    fitted: dict[str, Fitted] = {}
    for name, projector, history, problem in zip(names, projectors, histories, problems, strict=True):
        history.notes.append(kind_note)
        if problem is None:
            fitted[name] = (projector, centers[name], history)
        else:
            warnings.warn(f"{data.name} {name}: {problem}; retraining with the direct trainer", stacklevel=2)
            fitted[name] = direct(name, f"gram shortcut not applicable: {problem}")
    gram_models = {n: fit for n, fit in fitted.items() if fit[2].trainer == "gram"}
    if not gram_models:
        return fitted
    gram_total = stats.epoch_gram().cpu().numpy() if streamed else data.gram_total()
    with torch_threads(threads):  # the certificate's ops are as small as the steps' (measured: 3x faster)
        closest = certified_min_distance_sq(
            [fit[0] for fit in gram_models.values()], [fit[1] for fit in gram_models.values()], data.blocks,
            gram_total, data.sums.sum(0), n_images * data.pixels_per_image, cfg.radius, device=device)
    for (name, (_, _, history)), distance in zip(gram_models.items(), closest, strict=True):
        history.notes.append(f"every training pixel has ||z-c||^2 >= {distance:.6g} (certified)")
        if distance <= cfg.radius ** 2:
            message = f"a training pixel lies within R (||z-c||^2 = {distance:.3g})"
            warnings.warn(f"{data.name} {name}: {message}; retraining with the direct trainer", stacklevel=2)
            fitted[name] = direct(name, f"gram shortcut not applicable: {message}")
    return fitted
