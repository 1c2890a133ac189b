"""Stage ``train``: fit the projector of one center variant on every dataset category."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.atomic import torch_save_atomic, write_json
from polarocc.config import Params, TrainConfig, validate_norm
from polarocc.device import pick_device
from polarocc.errors import MissingOutputError, ModelError, NumericalError
from polarocc.features.budget import STREAMED, resolve_statistics
from polarocc.features.store import FeatureStore, read_rows
from polarocc.models.projector import Projector
from polarocc.pipeline import protocol_a
from polarocc.safe_load import torch_load_plain
from polarocc.training.certify import certified_min_distance_sq
from polarocc.training.direct import train_direct
from polarocc.training.gram import VariantDiverged, train_lockstep
from polarocc.training.schedule import TrainHistory
from polarocc.training.statistics import StoredStatistics, StreamedStatistics
from polarocc.training.threads import in_order, threads_for, torch_threads

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def statistics_source(store: FeatureStore, cfg: TrainConfig, device: str = "cpu"
                      ) -> StoredStatistics | StreamedStatistics:
    """Where a category's batch statistics come from: the stored per-image Gram matrices, or the features
    streamed once per epoch (``train.statistics``; ``auto`` decides as extraction did, by bytes)."""
    features = store.features("train")
    dtype = DTYPES[cfg.dtype]
    if statistics_mode(store, cfg) == STREAMED:
        # On a GPU, re-reading and decompressing the features every epoch would dominate a step, so they stay
        # in device memory when they fit; on the CPU forming G dominates and the page cache serves re-reads,
        # so host memory stays bounded by a batch.
        keep = cfg.stats_memory_mb * 2 ** 20 if device != "cpu" else 0
        return StreamedStatistics(features, dtype, device, memory_bytes=keep)
    if not store.has_stored_statistics:
        raise MissingOutputError(f"train.statistics is 'stored' but {store.path} was extracted without per-image "
                                 "statistics; rerun the extract stage (dvc repro) or set train.statistics to streamed")
    gram, sums = store.gram_stats(cfg.stats_memory_mb * 2 ** 20)
    return StoredStatistics(gram, sums, store.pixels_per_image, dtype, device)


def _step_flop(store: FeatureStore, variants: int, cfg: TrainConfig, streamed: bool) -> float:
    """FLOP of one lockstep step: V products W G (2 C^3 each), plus forming G when streamed."""
    c = store.channels
    forming = 2.0 * cfg.batch_size * store.pixels_per_image * c * c if streamed else cfg.batch_size * c * c
    return variants * 2.0 * c ** 3 + forming


def statistics_mode(store: FeatureStore, cfg: TrainConfig) -> str:
    """``train.statistics`` resolved for a category's training features (stored or streamed)."""
    features = store.features("train")
    _, channels, height, width = features.shape
    return resolve_statistics(cfg.statistics, channels, height, width, str(features.dtype))


def step_threads(store: FeatureStore, cfg: TrainConfig, variants: int, device: str) -> int:
    """The torch threads :func:`fit_store` gives a category's lockstep steps (:func:`threads_for`)."""
    return threads_for(_step_flop(store, variants, cfg, statistics_mode(store, cfg) == STREAMED), device)


def _totals(store: FeatureStore, stats: StoredStatistics | StreamedStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Summed Gram matrix and feature sum over the training split, for the radius certificate."""
    sums = store.group["train/sums"][:].sum(0)
    if isinstance(stats, StreamedStatistics):
        return stats.epoch_gram().cpu().numpy(), sums
    return store.gram_total(), sums


def fit_store(store: FeatureStore, params: Params, norm: float, distributions: tuple[str, ...],
              cfg: TrainConfig | None = None, on_step: Callable[[str, int, Projector], None] | None = None,
              device: str | None = None, threads: int | None = None,
              ) -> dict[str, tuple[Projector, torch.Tensor, TrainHistory]]:
    """Train one projector per center distribution on a category store (``cfg`` defaults to ``train``).

    Every distribution trains in lockstep from the same batch statistics (:func:`train_lockstep`). The
    statistics shortcut is exact only while no training pixel lies within R of the center; the final models are
    checked on every training pixel in one shared pass, and a model that fails is retrained with the direct
    trainer. ``on_step(distribution, images_seen, projector)`` follows every step; after a retraining it starts
    again from the first step. ``device`` defaults to ``train.device``; ``threads`` (torch threads of the steps
    and the certificate) to :func:`step_threads`.
    """
    cfg = cfg or params.train
    device = device or pick_device(cfg.device, "train.device")
    channels = store.channels
    dtype = DTYPES[cfg.dtype]
    centers = store.centers(distributions, norm, params.center.seed)
    train_features = store.features("train")
    n_images = train_features.shape[0]

    def fresh() -> Projector:
        return Projector(channels, params.projector.kind, params.projector.bias, seed=cfg.seed, dtype=dtype)

    def load_batch(indices: np.ndarray) -> np.ndarray:
        return read_rows(train_features, indices)

    def named(distribution: str, exc: FloatingPointError) -> NumericalError:
        return NumericalError(f"training {store.path} with the {distribution} center of norm {norm:g}: {exc}. "
                              "Models written before this one are kept; lower the norm or the learning rate")

    def direct(distribution: str, note: str | None = None) -> tuple[Projector, torch.Tensor, TrainHistory]:
        projector = fresh()
        observer = None if on_step is None else lambda seen: on_step(distribution, seen, projector)
        try:
            history = train_direct(projector, centers[distribution], load_batch, n_images, cfg, device,
                                   on_step=observer)
        except FloatingPointError as exc:
            raise named(distribution, exc) from exc
        if note:
            history.notes.append(note)
        return projector, centers[distribution], history

    if cfg.trainer == "direct":
        return {d: direct(d) for d in distributions}
    stats = statistics_source(store, cfg, device)
    streamed = isinstance(stats, StreamedStatistics)
    projectors = [fresh() for _ in distributions]
    observer = None if on_step is None else lambda v, seen: on_step(distributions[v], seen, projectors[v])
    threads = threads or step_threads(store, cfg, len(distributions), device)
    try:
        with torch_threads(threads):
            histories, problems = train_lockstep(projectors, [centers[d] for d in distributions], stats, n_images,
                                                 cfg, observer, device)
    except VariantDiverged as exc:
        raise named(distributions[exc.index], exc) from exc
    finally:
        if streamed:
            stats.close()
    kind = "streamed" if streamed else "stored"
    fitted: dict[str, tuple[Projector, torch.Tensor, TrainHistory]] = {}
    for distribution, projector, history, problem in zip(distributions, projectors, histories, problems, strict=True):
        history.notes.append(f"statistics {kind}")
        if problem is None:
            fitted[distribution] = (projector, centers[distribution], history)
        else:
            warnings.warn(f"{store.path} {distribution}: {problem}; retraining with the direct trainer", stacklevel=2)
            fitted[distribution] = direct(distribution, f"gram shortcut not applicable: {problem}")
    gram_models = {d: fit for d, fit in fitted.items() if fit[2].trainer == "gram"}
    if not gram_models:
        return fitted
    gram_total, sums_total = _totals(store, stats)
    with torch_threads(threads):  # the certificate's ops are as small as the steps' (measured: 3x faster)
        closest = certified_min_distance_sq(
            [fit[0] for fit in gram_models.values()], [fit[1] for fit in gram_models.values()],
            lambda: (f for _, f in store.batches("train")), gram_total, sums_total,
            n_images * store.pixels_per_image, cfg.radius, device=device)
    for (distribution, (_, _, history)), distance in zip(gram_models.items(), closest, strict=True):
        history.notes.append(f"every training pixel has ||z-c||^2 >= {distance:.6g} (certified)")
        if distance <= cfg.radius ** 2:
            message = f"a training pixel lies within R (||z-c||^2 = {distance:.3g})"
            warnings.warn(f"{store.path} {distribution}: {message}; retraining with the direct trainer", stacklevel=2)
            fitted[distribution] = direct(distribution, f"gram shortcut not applicable: {message}")
    return fitted


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


def _save(params: Params, norm: float, protocol: str, distribution: str, dataset: str, category: str,
          store: FeatureStore, fitted: tuple[Projector, torch.Tensor, TrainHistory], train_cfg: TrainConfig,
          histories: dict) -> None:
    projector, center, history = fitted
    meta = {"protocol": protocol, "distribution": distribution, "norm": norm, "dataset": dataset,
            "category": category, "store_fingerprint": store.attrs["fingerprint"],
            "backbone": store.attrs["backbone"], "geometry": store.attrs["geometry"], "train": vars(train_cfg).copy(),
            "projector_config": vars(params.projector).copy(), "history": history.to_dict()}
    save_model(layout.model_file(params, norm, distribution, dataset, category), projector,
               center, meta)
    histories.setdefault(distribution, {}).setdefault(dataset, {})[category] = history.to_dict()


def run_train(params: Params, norm: float, progress: bool = True) -> dict:
    """Train every distribution x dataset category at one norm; returns the training histories."""
    norm = validate_norm(norm, "norm")
    device = pick_device(params.train.device, "train.device")
    histories: dict[str, dict] = {}
    distributions = params.sweep.distributions
    jobs = [(d, c, FeatureStore(layout.feature_store(params, d, c)))
            for d, ds in params.datasets.items() for c in ds.categories]
    # Categories whose steps are too small for more than one thread train side by side, one per core (as
    # Protocol A's classes do); larger ones train in turn, each with every core and its own memory budget.
    # Each keeps its statistics within an equal share of train.stats_memory_mb, so the stage's peak stays that of
    # one category (stored statistics read from disk are the same bits as held ones).
    small = params.train.trainer == "gram" and all(
        step_threads(store, params.train, len(distributions), device) == 1 for *_, store in jobs)
    workers = min(os.cpu_count() or 1, len(jobs)) if small else 1
    cfg = params.train if workers == 1 else replace(
        params.train, stats_memory_mb=max(1, params.train.stats_memory_mb // workers))
    threads = 1 if workers > 1 else None

    def fit(job: tuple[str, str, FeatureStore]) -> dict[str, tuple[Projector, torch.Tensor, TrainHistory]]:
        return fit_store(job[2], params, norm, distributions, cfg=cfg, device=device, threads=threads)

    # torch's thread count is process-wide here: set once around the pool, so the workers' own (equal)
    # settings cannot race with each other or leak out.
    with torch_threads(threads or torch.get_num_threads()), closing(in_order(fit, jobs, workers)) as results:
        for (dataset, category, store), fitted in tqdm(zip(jobs, results, strict=True), total=len(jobs),
                                                       desc=f"train norm {norm:g}", unit="category",
                                                       disable=not progress):
            for distribution, model in fitted.items():
                _save(params, norm, "B", distribution, dataset, category, store, model, params.train, histories)
    for distribution, dataset, name, store, *fitted in protocol_a.fit_all(params, norm):
        _save(params, norm, "A", distribution, dataset, name, store, tuple(fitted),
              protocol_a.train_config(params), histories)
    write_json(layout.model_dir(params, norm) / "history.json", histories)
    return histories
