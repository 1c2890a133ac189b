"""Stage ``score``: anomaly maps and metrics of one center variant on every dataset category."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.analysis.polar import PolarAccumulator
from polarocc.atomic import write_json
from polarocc.config import Params, validate_norm
from polarocc.detector import protocol_a
from polarocc.detector.model_files import load_model
from polarocc.detector.stores import category_metrics, map_pixels, pixel_accumulators, score_store
from polarocc.device import pick_device
from polarocc.features.store import FeatureStore
from polarocc.scoring.pixel_metrics import results_of


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
        outputs = score_store(store, models, params.score, device, pixel=pixel, polar=polar,
                              progress=f"  {dataset}/{category}" if progress else None)
        pixel_results = results_of(pixel, map_pixels(store), params.score.metrics_memory_mb)
        for distribution, scores, pixel_result, diagnostics in zip(params.sweep.distributions, outputs, pixel_results,
                                                                    polar, strict=True):
            metrics = category_metrics(store, scores, pixel_result)
            results.setdefault(distribution, {}).setdefault(dataset, {})[category] = {
                **metrics, "polar": diagnostics.summary()}
    for distribution, per_dataset in protocol_a.score_all(params, norm).items():
        for dataset, per_class in per_dataset.items():
            results.setdefault(distribution, {}).setdefault(dataset, {}).update(per_class)
    write_json(layout.norm_scores(params, norm), {"norm": norm, "device": device, "results": results})
    return results
