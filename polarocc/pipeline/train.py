"""Stage ``train``: fit the projector of one center variant on every dataset category."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polarocc.atomic import torch_save_atomic, write_json
from polarocc.config import Params, TrainConfig, validate_norm
from polarocc.errors import MissingOutputError, ModelError, NumericalError
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.pipeline import paths, protocol_a
from polarocc.safe_load import torch_load_plain
from polarocc.training.certify import certified_min_distance_sq
from polarocc.training.direct import train_direct
from polarocc.training.gram import ShortcutInvalid, train_gram
from polarocc.training.schedule import TrainHistory

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def fit_store(store: FeatureStore, params: Params, norm: float, distributions: tuple[str, ...],
              cfg: TrainConfig | None = None, on_step: Callable[[str, int, Projector], None] | None = None,
              ) -> dict[str, tuple[Projector, torch.Tensor, TrainHistory]]:
    """Train one projector per center distribution on a category store (``cfg`` defaults to ``train``).

    The Gram shortcut is exact only while no training pixel lies within R of the center; the final
    models are checked on every training pixel in one shared pass, and a model that fails is retrained
    with the direct trainer. ``on_step(distribution, images_seen, projector)`` follows every step; after
    a retraining it starts again from the first step.
    """
    cfg = cfg or params.train
    channels = store.channels
    dtype = DTYPES[cfg.dtype]
    centers = store.centers(distributions, norm, params.center.seed)
    train_features = store.features("train")

    def fresh() -> Projector:
        return Projector(channels, params.projector.kind, params.projector.bias, seed=cfg.seed, dtype=dtype)

    def load_batch(indices: np.ndarray) -> np.ndarray:
        return train_features.oindex[np.sort(indices)]

    def observer(distribution: str, projector: Projector) -> Callable[[int], None] | None:
        return None if on_step is None else lambda seen: on_step(distribution, seen, projector)

    def named(distribution: str, exc: FloatingPointError) -> NumericalError:
        return NumericalError(f"training {store.path} with the {distribution} center of norm {norm:g}: {exc}. "
                              "Models written before this one are kept; lower the norm or the learning rate")

    def direct(distribution: str, note: str | None = None) -> tuple[Projector, torch.Tensor, TrainHistory]:
        projector = fresh()
        try:
            history = train_direct(projector, centers[distribution], load_batch, train_features.shape[0], cfg,
                                   on_step=observer(distribution, projector))
        except FloatingPointError as exc:
            raise named(distribution, exc) from exc
        if note:
            history.notes.append(note)
        return projector, centers[distribution], history

    fitted: dict[str, tuple[Projector, torch.Tensor, TrainHistory]] = {}
    if cfg.trainer == "direct":
        return {d: direct(d) for d in distributions}
    gram, sums = store.gram_stats(cfg.stats_memory_mb * 2 ** 20)
    for distribution in distributions:
        projector = fresh()
        try:
            history = train_gram(projector, centers[distribution], gram, sums, store.pixels_per_image, cfg,
                                 on_step=observer(distribution, projector))
            fitted[distribution] = (projector, centers[distribution], history)
        except FloatingPointError as exc:
            raise named(distribution, exc) from exc
        except ShortcutInvalid as exc:
            warnings.warn(f"{store.path} {distribution}: {exc}; retraining with the direct trainer", stacklevel=2)
            fitted[distribution] = direct(distribution, f"gram shortcut not applicable: {exc}")
    gram_models = {d: fit for d, fit in fitted.items() if fit[2].trainer == "gram"}
    closest = certified_min_distance_sq(
        [fit[0] for fit in gram_models.values()], [fit[1] for fit in gram_models.values()],
        lambda: (f for _, f in store.batches("train")), store.gram_total(), sums.sum(0),
        len(sums) * store.pixels_per_image, cfg.radius)
    for (distribution, (_, _, history)), distance in zip(gram_models.items(), closest, strict=True):
        history.notes.append(f"every training pixel has ||z-c||^2 >= {distance:.6g} (certified)")
        if distance <= cfg.radius ** 2:
            message = f"a training pixel lies within R (||z-c||^2 = {distance:.3g})"
            warnings.warn(f"{store.path} {distribution}: {message}; retraining with the direct trainer", stacklevel=2)
            fitted[distribution] = direct(distribution, f"gram shortcut not applicable: {message}")
    return fitted


def save_model(path: Path, projector: Projector, center: torch.Tensor, meta: dict) -> None:
    """Write a trained projector with its center and provenance (atomic)."""
    torch_save_atomic({"projector": projector.state(), "center": center.cpu(), **meta}, path,
                      path.with_suffix(".partial"))


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


def _save(params: Params, norm: float, protocol: str, distribution: str, dataset: str, category: str,
          store: FeatureStore, fitted: tuple[Projector, torch.Tensor, TrainHistory], train_cfg: TrainConfig,
          histories: dict) -> None:
    projector, center, history = fitted
    meta = {"protocol": protocol, "distribution": distribution, "norm": norm, "dataset": dataset,
            "category": category, "store_fingerprint": store.attrs["fingerprint"],
            "backbone": store.attrs["backbone"], "geometry": store.attrs["geometry"], "train": vars(train_cfg).copy(),
            "projector_config": vars(params.projector).copy(), "history": history.to_dict()}
    save_model(paths.model_file(params, norm, distribution, dataset, category), projector,
               center, meta)
    histories.setdefault(distribution, {}).setdefault(dataset, {})[category] = history.to_dict()


def run_train(params: Params, norm: float, progress: bool = True) -> dict:
    """Train every distribution x dataset category at one norm; returns the training histories."""
    norm = validate_norm(norm, "norm")
    torch.set_num_threads(os.cpu_count() or 1)
    histories: dict[str, dict] = {}
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    for dataset, category in tqdm(jobs, desc=f"train norm {norm:g}", unit="category", disable=not progress):
        store = FeatureStore(paths.feature_store(params, dataset, category))
        for distribution, fitted in fit_store(store, params, norm, params.sweep.distributions).items():
            _save(params, norm, "B", distribution, dataset, category, store, fitted, params.train, histories)
    for distribution, dataset, name, store, *fitted in protocol_a.fit_all(params, norm):
        _save(params, norm, "A", distribution, dataset, name, store, tuple(fitted),
              protocol_a.train_config(params), histories)
    write_json(paths.model_dir(params, norm) / "history.json", histories)
    return histories
