"""Turn trained variants into self-describing model files (stage ``export`` and ``polarocc export``)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from polarocc import layout
from polarocc.config import Params, validate_norm
from polarocc.detector.artefact import check_model_target, save_artefact
from polarocc.detector.model_files import build_artefact, load_model
from polarocc.device import pick_device
from polarocc.errors import ConfigError, ModelError
from polarocc.features.store import FeatureStore


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
