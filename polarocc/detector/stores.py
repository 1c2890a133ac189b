"""The method on cached feature stores: fit the projectors of a category's center variants, score a split with
several models at once, and the per-category metrics. The pipeline's stages call these; the training and the
scoring themselves are :func:`polarocc.training.fit.fit_projectors` and :mod:`polarocc.scoring.maps`, which
:class:`polarocc.Detector` uses as well."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from polarocc.analysis.polar import PolarAccumulator, store_position_labels
from polarocc.config import Params, ScoreConfig, TrainConfig
from polarocc.device import pick_device
from polarocc.errors import MissingOutputError
from polarocc.features.budget import STORED, STREAMED, resolve_statistics
from polarocc.features.store import CachedRows, FeatureStore, RowSubset
from polarocc.memory import release_free_memory
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.scoring.maps import chunk_images, finish_maps, project
from polarocc.scoring.metrics import f1_max, image_auroc
from polarocc.scoring.pixel_metrics import PixelMetrics, pixel_metrics_for
from polarocc.training.fit import Fitted, TrainingFeatures, fit_projectors, step_flop
from polarocc.training.threads import threads_for


def statistics_mode(store: FeatureStore, cfg: TrainConfig) -> str:
    """``train.statistics`` resolved for a category's training features (stored or streamed)."""
    features = store.features("train")
    _, channels, height, width = features.shape
    return resolve_statistics(cfg.statistics, channels, height, width, str(features.dtype))


def step_threads(store: FeatureStore, cfg: TrainConfig, variants: int, device: str) -> int:
    """The torch threads :func:`fit_store` gives a category's lockstep steps (:func:`threads_for`)."""
    streamed = statistics_mode(store, cfg) == STREAMED
    return threads_for(step_flop(store.channels, store.pixels_per_image, variants, cfg, streamed), device)


def training_features(store: FeatureStore, rows: np.ndarray | None = None) -> TrainingFeatures:
    """A store's training split as the trainers read it; with ``rows`` (ascending), only those training images."""
    has = store.has_stored_statistics
    if rows is None:
        return TrainingFeatures(store.features("train"), store.group["train/sums"][:],
                                lambda: (f for _, f in store.batches("train")), str(store.path),
                                store.gram_stats if has else None, store.gram_total if has else None)
    subset = RowSubset(store.features("train"), rows)
    step = int(store.features("train").shards[0])
    return TrainingFeatures(subset, store.group["train/sums"][:][subset.rows],
                            lambda: (subset[i:i + step] for i in range(0, len(subset), step)),
                            f"{store.path} ({len(subset)} of its training images)",
                            (lambda memory: store.gram_stats(memory, subset.rows)) if has else None,
                            (lambda: store.gram_total(subset.rows)) if has else None)


def fit_store(store: FeatureStore, params: Params, norm: float, distributions: tuple[str, ...],
              cfg: TrainConfig | None = None, on_step: Callable[[str, int, Projector], None] | None = None,
              device: str | None = None, threads: int | None = None, rows: np.ndarray | None = None,
              ) -> dict[str, Fitted]:
    """Train one projector per center distribution on a category store (``cfg`` defaults to ``train``) with
    :func:`fit_projectors`: every distribution in lockstep from the same batch statistics, certified, retrained
    directly where the shortcut does not hold. ``on_step(distribution, images_seen, projector)`` follows every
    step. ``device`` defaults to ``train.device``; ``threads`` to :func:`step_threads`. With ``rows`` (ascending
    training-image indices) only those images are trained on, and a ``feature_mean`` center is their mean.
    """
    cfg = cfg or params.train
    device = device or pick_device(cfg.device, "train.device")
    mode = statistics_mode(store, cfg)
    if cfg.trainer == "gram" and mode == STORED and not store.has_stored_statistics:
        raise MissingOutputError(f"train.statistics is 'stored' but {store.path} was extracted without per-image "
                                 "statistics; rerun the extract stage (dvc repro) or set train.statistics to streamed")
    data = training_features(store, rows)
    if rows is None:
        centers = store.centers(distributions, norm, params.center.seed)
    else:
        mean = data.sums.sum(0) / (len(rows) * store.pixels_per_image)
        centers = {d: make_center(d, norm, store.channels, params.center.seed, feature_mean=mean)
                   for d in distributions}
    return fit_projectors(data, centers, cfg, params.projector.kind, params.projector.bias, mode, device,
                          threads or step_threads(store, cfg, len(distributions), device), on_step,
                          lambda distribution: f"the {distribution} center of norm {norm:g}")


def score_store(store: FeatureStore | CachedRows, models: list[tuple[Projector, torch.Tensor]], cfg: ScoreConfig,
                device: str = "cpu", split: str = "test", pixel: list[PixelMetrics] | None = None,
                polar: list[PolarAccumulator] | None = None, rows: np.ndarray | None = None,
                progress: str | None = None) -> list[np.ndarray]:
    """Per model, the image scores (N,) of a store's split (of its images ``rows`` only, ascending, when given).

    The features are read once, a few images at a time (:func:`chunk_images`), and shared by every model; no
    map outlives its chunk. With ``pixel`` (one accumulator per model, test split) the maps and their masks feed the
    pixel metrics; with ``polar`` (likewise, whole split) the projected features feed the polar diagnostics.
    ``progress``: the label of a progress bar over the images (none when None).
    """
    if polar is not None and rows is not None:
        raise ValueError("polar diagnostics need the whole split: pass rows=None")
    models = [(p.to(device), c.to(device=device, dtype=p.weight.dtype)) for p, c in models]
    size = store.geometry.size
    step = chunk_images(store.channels, *store.features(split).shape[2:])
    scores: list[list[np.ndarray]] = [[] for _ in models]
    z = distances = batch_maps = None
    image_labels = None if polar is None else np.array([s.label for s in store.samples("test")])
    total = store.features(split).shape[0] if rows is None else len(rows)
    # A few images at a time, read as such (the stores chunk each image within a shard): the float32 work and
    # the reads scale with this chunk, not with the shard, so a small test split peaks as high as a large one.
    with tqdm(total=total, desc=progress, unit="image", leave=False, disable=progress is None) as bar:
        for indices, features in store.chunks(split, step, rows):
            chosen = slice(int(indices[0]), int(indices[-1]) + 1) if rows is None else indices
            masks = None if pixel is None else store.masks(chosen)
            labels = None if polar is None else store_position_labels(store, chosen, image_labels)
            batch = torch.from_numpy(features).to(device)
            for i, (projector, center) in enumerate(models):
                z, distances = project(projector, center, batch, cfg.squared)
                batch_maps, batch_scores = finish_maps(distances, size, cfg.sigma, cfg.reduction, cfg.topk)
                if labels is not None:
                    polar[i].add(z, labels)
                if masks is not None:
                    pixel[i].add(batch_maps.float().cpu().numpy(), masks)
                scores[i].append(batch_scores.double().cpu().numpy())
            features = batch = z = distances = batch_maps = None  # freed before the heap is trimmed
            release_free_memory()
            bar.update(len(indices))
    return [np.concatenate(s) for s in scores]


def defect_type_pixel_metrics(store: FeatureStore, projector: Projector, center: torch.Tensor, cfg: ScoreConfig,
                               device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Pixel ROC AUC and AUPRO of each defect type: the maps of that type's images and of the good images, so a
    type's small regions are not drowned by the others' (empty for an image-level category). One pass over the
    test features; each type's accumulator is exact while it fits ``score.metrics_memory_mb``."""
    if not store.has_masks:
        return {}
    kinds = [s.defect_type for s in store.samples("test")]
    height, width = store.geometry.size
    types = sorted(set(kinds) - {"good"})
    good = kinds.count("good")
    # Every type's accumulator is alive at once (the good maps in each): they share the budget.
    budget = cfg.metrics_memory_mb / max(len(types), 1)
    accumulators = {t: pixel_metrics_for((good + kinds.count(t)) * height * width, 1, budget)[0] for t in types}
    projector, center = projector.to(device), center.to(device=device, dtype=projector.weight.dtype)
    for indices, features in store.batches("test", chunk_images(store.channels, *store.features("test").shape[2:])):
        rows = slice(int(indices[0]), int(indices[-1]) + 1)
        _, distances = project(projector, center, torch.from_numpy(features).to(device), cfg.squared)
        maps = finish_maps(distances, (height, width), cfg.sigma, cfg.reduction, cfg.topk)[0].float().cpu().numpy()
        masks = store.masks(rows)
        for i, index in enumerate(indices):
            targets = types if kinds[index] == "good" else [kinds[index]]
            for t in targets:
                accumulators[t].add(maps[i:i + 1], masks[i:i + 1])
    return {t: {k: v for k, v in a.result().items() if k in ("pixel_auroc", "aupro")} for t, a in accumulators.items()}


def pixel_accumulators(store: FeatureStore, models: int, cfg: ScoreConfig) -> list[PixelMetrics]:
    """One pixel-metric accumulator per model for a store's test split, exact while it fits
    ``score.metrics_memory_mb`` (see :func:`pixel_metrics_for`)."""
    return pixel_metrics_for(map_pixels(store), models, cfg.metrics_memory_mb, store.has_masks)


def map_pixels(store: FeatureStore) -> int:
    """Pixels of a store's test maps (every test image at the model input's size)."""
    height, width = store.geometry.size
    return store.features("test").shape[0] * height * width


def category_metrics(store: FeatureStore, scores: np.ndarray, pixel: dict) -> dict:
    """Image ROC AUC and F1-max of one category with its image scores, beside the ``pixel`` metrics
    (pixel ROC AUC, AUPRO at FPR <= 0.3, pixel F1-max) of a :class:`PixelMetrics` accumulator."""
    samples = store.samples("test")
    labels = np.array([s.label for s in samples])
    return {
        "protocol": "B",
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel["pixel_auroc"],
        "aupro": pixel["aupro"],
        "image_f1_max": f1_max(labels, scores),
        "pixel_f1_max": pixel["pixel_f1_max"],
        "pixel_metrics": pixel["pixel_metrics"],
        **({"pixel_auroc_tie_bound": pixel["pixel_auroc_tie_bound"]} if "pixel_auroc_tie_bound" in pixel else {}),
        "n_test": len(samples),
        "n_anomalous": int(labels.sum()),
        "scores": [round(float(s), 6) for s in scores],
        "labels": labels.tolist(),
        "defect_types": [s.defect_type for s in samples],
    }


