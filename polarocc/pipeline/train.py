"""Stage ``train``: fit the projector of one center variant on every dataset category."""

from __future__ import annotations

import os
from contextlib import closing
from dataclasses import replace

import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.atomic import write_json
from polarocc.config import Params, TrainConfig, validate_norm
from polarocc.detector import protocol_a
from polarocc.detector.model_files import save_model
from polarocc.detector.stores import fit_store, step_threads
from polarocc.device import pick_device
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.training.progress import ImagesSeen
from polarocc.training.schedule import TrainHistory
from polarocc.training.threads import in_order, torch_threads


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
    workers = max(1, min(os.cpu_count() or 1, len(jobs))) if small else 1
    cfg = params.train if workers == 1 else replace(
        params.train, stats_memory_mb=max(1, params.train.stats_memory_mb // workers))
    threads = 1 if workers > 1 else None

    image_epochs = sum(store.features("train").shape[0] for *_, store in jobs) * cfg.epochs
    steps = tqdm(total=image_epochs, desc=f"train norm {norm:g}", unit="image", unit_scale=True,
                 disable=not progress)

    def fit(job: tuple[str, str, FeatureStore]) -> dict[str, tuple[Projector, torch.Tensor, TrainHistory]]:
        return fit_store(job[2], params, norm, distributions, cfg=cfg, device=device, threads=threads,
                         on_step=ImagesSeen(steps, distributions))

    # torch's thread count is process-wide here: set once around the pool, so the workers' own (equal)
    # settings cannot race with each other or leak out.
    with (steps, torch_threads(threads or torch.get_num_threads()),
          closing(in_order(fit, jobs, workers)) as results):
        for (dataset, category, store), fitted in zip(jobs, results, strict=True):
            for distribution, model in fitted.items():
                _save(params, norm, "B", distribution, dataset, category, store, model, params.train, histories)
    for distribution, dataset, name, store, *fitted in protocol_a.fit_all(params, norm):
        _save(params, norm, "A", distribution, dataset, name, store, tuple(fitted),
              protocol_a.train_config(params), histories)
    write_json(layout.model_dir(params, norm) / "history.json", histories)
    return histories
