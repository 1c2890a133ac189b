"""Turn trained variants into self-describing model files (stage ``export`` and ``polarocc export``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.config import Params, validate_norm
from polarocc.deploy.artefact import ModelArtefact, check_model_target, save_artefact, score_settings
from polarocc.deploy.threshold import quantile_threshold
from polarocc.device import pick_device
from polarocc.errors import ConfigError, ModelError
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.pipeline.score import score_store
from polarocc.pipeline.train import load_model


def build_artefact(projector: Projector, center: torch.Tensor, store: FeatureStore, params: Params,
                   train: dict[str, Any], provenance: dict[str, Any], device: str = "cpu") -> ModelArtefact:
    """A model file's content: the threshold is a quantile of the store's normal training scores."""
    [normal] = score_store(store, [(projector, center)], params.score, device, split="train")
    projector.to("cpu")
    attrs = store.attrs
    return ModelArtefact(
        projector=projector.state(), center=center.detach().cpu().to(torch.float64), backbone=attrs["backbone"],
        geometry=attrs["geometry"], feature_shape=tuple(int(n) for n in store.features("train").shape[1:]),
        score=score_settings(params.score), threshold=quantile_threshold(normal, params.deploy.threshold_quantile),
        normal_scores=[float(s) for s in normal], train=train,
        provenance={**provenance, "store": str(store.path), "store_fingerprint": attrs["fingerprint"]})


def export_variant(params: Params, norm: float, distribution: str, dataset: str, category: str,
                   out: Path | None = None, device: str = "cpu") -> Path:
    """Save one trained Protocol B variant as a model file (default: models/deploy/<dataset>/<category>.pt)."""
    norm = validate_norm(norm, "norm")
    if dataset not in params.datasets:
        known = ", ".join(params.datasets)
        raise ModelError(f"dataset {dataset!r} has no Protocol B models (declared: {known}); Protocol A models "
                         "score pooled whole-image features and cannot be exported for predict yet")
    if category not in params.datasets[dataset].categories:
        raise ConfigError(f"category {category!r} is not one of datasets.{dataset}.categories "
                          f"({', '.join(params.datasets[dataset].categories)})")
    if distribution not in params.sweep.distributions or norm not in [float(n) for n in params.sweep.norms]:
        raise ConfigError(f"the {distribution} center of norm {norm:g} is not in the sweep (sweep.distributions, "
                          "sweep.norms): add it there and run `dvc repro`, then export")
    check_model_target(out or layout.deploy_model(params, dataset, category))
    store = FeatureStore(layout.feature_store(params, dataset, category))
    path = layout.model_file(params, norm, distribution, dataset, category)
    projector, center, meta = load_model(path, store)
    train = {**meta["train"], "history": meta["history"]}
    provenance = {"protocol": meta["protocol"], "dataset": dataset, "category": category,
                  "distribution": distribution, "norm": norm}
    artefact = build_artefact(projector, center, store, params, train, provenance, device)
    return save_artefact(out or layout.deploy_model(params, dataset, category), artefact)


def run_export(params: Params, progress: bool = True) -> list[Path]:
    """Save the default center variant of every Protocol B category."""
    device = pick_device(params.score.device, "score.device")
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    return [export_variant(params, params.center.norm, params.center.distribution, dataset, category,
                           device=device)
            for dataset, category in tqdm(jobs, desc="export", unit="model", disable=not progress)]
