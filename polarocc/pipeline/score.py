"""Stage ``score``: anomaly maps and metrics of one center variant on every dataset category."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from tqdm import tqdm

from polarocc.analysis.polar import PolarAccumulator, store_position_labels
from polarocc.config import Params, ScoreConfig, validate_norm
from polarocc.features.extract import pick_device
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.pipeline import paths, protocol_a
from polarocc.pipeline.train import load_model
from polarocc.scoring.maps import finish_maps, project
from polarocc.scoring.metrics import aupro, connected_regions, f1_max, image_auroc, pixel_auroc


def score_store(store: FeatureStore, models: list[tuple[Projector, torch.Tensor]], cfg: ScoreConfig,
                device: str = "cpu", split: str = "test", keep_maps: bool = True,
                polar: list[PolarAccumulator] | None = None) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Per model, (image scores (N,), anomaly maps (N, crop, crop) float32 or None) of a store's split.

    The features are read once, one shard at a time, and shared by every model. With ``polar`` (one
    accumulator per model, test split), the projected features also feed the polar diagnostics.
    """
    models = [(p.to(device), c.to(device=device, dtype=p.weight.dtype)) for p, c in models]
    crop = int(store.attrs["geometry"]["crop"])
    scores: list[list[np.ndarray]] = [[] for _ in models]
    maps: list[list[np.ndarray]] = [[] for _ in models]
    labels = None if polar is None else store_position_labels(store)
    for indices, features in store.batches(split):
        batch = torch.from_numpy(features).to(device)
        for i, (projector, center) in enumerate(models):
            z, distances = project(projector, center, batch, cfg.squared)
            batch_maps, batch_scores = finish_maps(distances, crop, cfg.sigma, cfg.reduction, cfg.topk)
            if labels is not None:
                polar[i].add(z, labels[indices])
            if keep_maps:
                maps[i].append(batch_maps.float().cpu().numpy())
            scores[i].append(batch_scores.double().cpu().numpy())
    return [(np.concatenate(s), np.concatenate(m) if keep_maps else None) for s, m in zip(scores, maps, strict=True)]


def category_metrics(store: FeatureStore, scores: np.ndarray, maps: np.ndarray, masks: np.ndarray,
                     regions: np.ndarray | None = None) -> dict:
    """Image and pixel ROC AUC, AUPRO (FPR <= 0.3) and F1-max of one category, with its image scores."""
    samples = store.samples("test")
    labels = np.array([s.label for s in samples])
    return {
        "protocol": "B",
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps, regions=regions),
        "image_f1_max": f1_max(labels, scores),
        "pixel_f1_max": f1_max(masks, maps),
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
    device = pick_device(params.score.device)
    results: dict[str, dict] = {}
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    for dataset, category in tqdm(jobs, desc=f"score norm {norm:g}", unit="category", disable=not progress):
        store = FeatureStore(paths.feature_store(params, dataset, category))
        models = []
        for distribution in params.sweep.distributions:
            projector, center, meta = load_model(paths.model_file(params, norm, distribution, dataset, category))
            if meta["store_fingerprint"] != store.attrs["fingerprint"]:
                raise RuntimeError(f"model {distribution}/{dataset}/{category} at norm {norm:g} was trained on "
                                   "other features; rerun the train stage")
            models.append((projector, center))
        masks = store.masks()
        regions = connected_regions(masks)
        polar = [PolarAccumulator(center) for _, center in models]
        outputs = score_store(store, models, params.score, device, polar=polar)
        for distribution, (scores, maps), diagnostics in zip(params.sweep.distributions, outputs, polar, strict=True):
            metrics = category_metrics(store, scores, maps, masks, regions)
            results.setdefault(distribution, {}).setdefault(dataset, {})[category] = {
                **metrics, "polar": diagnostics.summary()}
    for distribution, per_dataset in protocol_a.score_all(params, norm, load_model).items():
        for dataset, per_class in per_dataset.items():
            results.setdefault(distribution, {}).setdefault(dataset, {}).update(per_class)
    out = paths.norm_scores(params, norm)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"norm": norm, "device": device, "results": results}, indent=1))
    return results
