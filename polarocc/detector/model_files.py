"""Files of trained variants: the pipeline's per-variant model files (projector, center, provenance) and the
self-describing model files (:class:`polarocc.detector.artefact.ModelArtefact`) made from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from polarocc.atomic import torch_save_atomic
from polarocc.config import Params
from polarocc.detector.artefact import ModelArtefact, Threshold, score_settings
from polarocc.detector.threshold import holdout_quantile_threshold, quantile_threshold
from polarocc.errors import MissingOutputError, ModelError
from polarocc.features.store import FeatureStore, RowSubset
from polarocc.models.projector import Projector
from polarocc.safe_load import torch_load_plain
from polarocc.scoring.maps import score_batch


def save_model(path: Path, projector: Projector, center: torch.Tensor, meta: dict) -> None:
    """Write a trained projector with its center and provenance (atomic).

    The weights are saved in float32, the precision every reader uses them in (:func:`load_model`): training's
    float64 only keeps the statistics' sums exact, and at 1792 channels it would double each file (25.7 MB).
    """
    state = projector.state()
    state.update({k: state[k].float() for k in ("weight", "bias") if isinstance(state[k], torch.Tensor)})
    torch_save_atomic({"projector": state, "center": center.cpu(), **meta}, path, path.with_suffix(".partial"))


def load_model(path: Path, store: FeatureStore | None = None) -> tuple[Projector, torch.Tensor, dict]:
    """Inverse of :func:`save_model`: (projector, center, metadata). Only tensors and plain data are read; with
    ``store``, a model trained on other features than the store holds is refused."""
    if not path.is_file():
        raise MissingOutputError(f"no trained model at {path}: run the train stage (dvc repro train)")
    fix = "rerun the train stage (dvc repro train)"
    state = torch_load_plain(path, ModelError, "a trained projector", fix)
    try:
        projector = Projector.from_state(state.pop("projector"), dtype=torch.float32)
        center = state.pop("center")
    except (AttributeError, KeyError, TypeError, RuntimeError) as exc:
        raise ModelError(f"{path} is not a trained projector of this pipeline ({type(exc).__name__}: {exc}); "
                         f"{fix}") from exc
    if not isinstance(center, torch.Tensor) or not isinstance(state.get("store_fingerprint"), str):
        raise ModelError(f"{path} lacks its center or store fingerprint; {fix}")
    if store is not None:
        store.check_trained_on(state["store_fingerprint"], str(path))
    return projector, center, state



MAP_SCALE_PERCENTILES = (50.0, 99.9)  # overlay colours: median normal pixel -> dark, rare normal pixel -> bright


def maps_and_scores(projector: Projector, center: torch.Tensor, features: Any, input_size: tuple[int, int],
                    settings: dict[str, Any], device: str = "cpu", size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(maps (N, height, width) float32 at the model ``input_size``, image scores (N,) float64) of cached features
    (N, C, h, w): a numpy, zarr or :class:`RowSubset` array read ``size`` images at a time, scored in float32 as the
    score stage does."""
    projector = projector.to(device)
    center = center.to(device=device, dtype=projector.weight.dtype)
    maps, scores = [], []
    for start in range(0, features.shape[0], size):
        batch = torch.from_numpy(np.ascontiguousarray(features[start:start + size])).to(device).float()
        m, s = score_batch(projector, center, batch, input_size, float(settings["sigma"]), str(settings["reduction"]),
                           int(settings["topk"]), bool(settings["squared"]))
        maps.append(m.float().cpu().numpy())
        scores.append(s.double().cpu().numpy())
    return np.concatenate(maps), np.concatenate(scores)


def calibrate(projector: Projector, center: torch.Tensor, normal_features: Any, input_size: tuple[int, int],
              settings: dict[str, Any], quantile: float, held_out: bool,
              device: str = "cpu") -> tuple[Threshold, np.ndarray, list[float]]:
    """(threshold, normal scores, overlay colour scale) from normal images' features: the ``quantile`` of their
    scores (``held_out``: images the model was not trained on, else its training images) and percentiles of their
    map pixels."""
    maps, scores = maps_and_scores(projector, center, normal_features, input_size, settings, device)
    threshold = (holdout_quantile_threshold if held_out else quantile_threshold)(scores, quantile)
    low, high = (float(v) for v in np.percentile(maps, MAP_SCALE_PERCENTILES))
    return threshold, scores, [low, high if high > low else float(np.nextafter(low, np.inf))]


def float32_copy(projector: Projector) -> Projector:
    """The projector as the score stage reads it from its file (training's float64 keeps sums exact only)."""
    return Projector.from_state(projector.state(), dtype=torch.float32)


def build_artefact(projector: Projector, center: torch.Tensor, store: FeatureStore, params: Params,
                   train: dict[str, Any], provenance: dict[str, Any], device: str = "cpu",
                   held_out: np.ndarray | None = None) -> ModelArtefact:
    """A model file's content. Its threshold is a quantile of normal scores: those of the training images
    ``held_out`` of the projector's training (ascending indices), or else of every training image (in-sample,
    lower); their maps set the overlay colours. Features are scored as stored (``feature_dtype``)."""
    features = store.features("train")
    settings = {**score_settings(params.score), "feature_dtype": str(features.dtype)}
    normal = features if held_out is None else RowSubset(features, held_out)
    threshold, scores, scale = calibrate(float32_copy(projector), center, normal, store.geometry.size, settings,
                                         params.deploy.threshold_quantile, held_out is not None, device)
    attrs = store.attrs
    # Where normal_scores came from, when not the training images (older readers assume those).
    origin = {} if held_out is None else {"normal_scores": {"source": "holdout", "stream": 0, "carried": 0}}
    return ModelArtefact(
        projector=float32_copy(projector).state(), center=center.detach().cpu().to(torch.float64),
        backbone=attrs["backbone"], geometry=attrs["geometry"], feature_shape=tuple(int(n) for n in features.shape[1:]),
        score=settings, threshold=threshold, normal_scores=[float(s) for s in scores], train=train,
        provenance={**provenance, "store": str(store.path), "store_fingerprint": attrs["fingerprint"], **origin},
        map_scale=scale)
