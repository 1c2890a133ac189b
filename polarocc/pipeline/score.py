"""Stage ``score``: anomaly maps and metrics of one center variant on every dataset category."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.analysis.polar import PolarAccumulator, store_position_labels
from polarocc.atomic import write_json
from polarocc.config import Params, ScoreConfig, validate_norm
from polarocc.device import pick_device
from polarocc.features.store import FeatureStore
from polarocc.memory import release_free_memory
from polarocc.models.projector import Projector
from polarocc.pipeline import protocol_a
from polarocc.pipeline.train import load_model
from polarocc.scoring.maps import chunk_images, finish_maps, project
from polarocc.scoring.metrics import f1_max, image_auroc
from polarocc.scoring.pixel_metrics import PixelMetrics, pixel_metrics_for, results_of


def score_store(store: FeatureStore, models: list[tuple[Projector, torch.Tensor]], cfg: ScoreConfig,
                device: str = "cpu", split: str = "test", pixel: list[PixelMetrics] | None = None,
                polar: list[PolarAccumulator] | None = None) -> list[np.ndarray]:
    """Per model, the image scores (N,) of a store's split.

    The features are read once, a few images at a time (:func:`chunk_images`), and shared by every model; no
    map outlives its chunk. With ``pixel`` (one accumulator per model, test split) the maps and their masks feed the
    pixel metrics; with ``polar`` (likewise) the projected features feed the polar diagnostics.
    """
    models = [(p.to(device), c.to(device=device, dtype=p.weight.dtype)) for p, c in models]
    crop = int(store.attrs["geometry"]["crop"])
    step = chunk_images(store.channels, *store.features(split).shape[2:])
    scores: list[list[np.ndarray]] = [[] for _ in models]
    z = distances = batch_maps = None
    image_labels = None if polar is None else np.array([s.label for s in store.samples("test")])
    # A few images at a time, read as such (the stores chunk each image within a shard): the float32 work and
    # the reads scale with this chunk, not with the shard, so a small test split peaks as high as a large one.
    for indices, features in store.batches(split, step):
        rows = slice(int(indices[0]), int(indices[-1]) + 1)
        masks = None if pixel is None else store.masks(rows)
        labels = None if polar is None else store_position_labels(store, rows, image_labels)
        batch = torch.from_numpy(features).to(device)
        for i, (projector, center) in enumerate(models):
            z, distances = project(projector, center, batch, cfg.squared)
            batch_maps, batch_scores = finish_maps(distances, crop, cfg.sigma, cfg.reduction, cfg.topk)
            if labels is not None:
                polar[i].add(z, labels)
            if masks is not None:
                pixel[i].add(batch_maps.float().cpu().numpy(), masks)
            scores[i].append(batch_scores.double().cpu().numpy())
        features = batch = z = distances = batch_maps = None  # freed before the heap is trimmed
        release_free_memory()
    return [np.concatenate(s) for s in scores]


def pixel_accumulators(store: FeatureStore, models: int, cfg: ScoreConfig) -> list[PixelMetrics]:
    """One pixel-metric accumulator per model for a store's test split, exact while it fits
    ``score.metrics_memory_mb`` (see :func:`pixel_metrics_for`)."""
    return pixel_metrics_for(map_pixels(store), models, cfg.metrics_memory_mb)


def map_pixels(store: FeatureStore) -> int:
    """Pixels of a store's test maps (every test image at the crop size)."""
    crop = int(store.attrs["geometry"]["crop"])
    return store.features("test").shape[0] * crop * crop


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


def run_score(params: Params, norm: float, progress: bool = True) -> dict:
    """Score every distribution x dataset category at one norm and write the norm's metrics JSON."""
    norm = validate_norm(norm, "norm")
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(params.score.device, "score.device")
    results: dict[str, dict] = {}
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    for dataset, category in tqdm(jobs, desc=f"score norm {norm:g}", unit="category", disable=not progress):
        store = FeatureStore(layout.feature_store(params, dataset, category))
        models = []
        for distribution in params.sweep.distributions:
            path = layout.model_file(params, norm, distribution, dataset, category)
            projector, center, _ = load_model(path, store)
            models.append((projector, center))
        polar = [PolarAccumulator(center) for _, center in models]
        pixel = pixel_accumulators(store, len(models), params.score)
        outputs = score_store(store, models, params.score, device, pixel=pixel, polar=polar)
        pixel_results = results_of(pixel, map_pixels(store), params.score.metrics_memory_mb)
        for distribution, scores, pixel_result, diagnostics in zip(params.sweep.distributions, outputs, pixel_results,
                                                                    polar, strict=True):
            metrics = category_metrics(store, scores, pixel_result)
            results.setdefault(distribution, {}).setdefault(dataset, {})[category] = {
                **metrics, "polar": diagnostics.summary()}
    for distribution, per_dataset in protocol_a.score_all(params, norm, load_model).items():
        for dataset, per_class in per_dataset.items():
            results.setdefault(distribution, {}).setdefault(dataset, {}).update(per_class)
    write_json(layout.norm_scores(params, norm), {"norm": norm, "device": device, "results": results})
    return results
