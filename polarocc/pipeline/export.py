"""Turn trained variants into self-describing model files (stage ``export`` and ``polarocc export``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from polarocc import layout
from polarocc.config import Params, validate_norm
from polarocc.detector.artefact import ModelArtefact, check_model_target, save_artefact
from polarocc.detector.model_files import build_artefact, load_model
from polarocc.detector.stores import fit_store
from polarocc.detector.threshold import held_out_rows
from polarocc.device import pick_device
from polarocc.errors import ConfigError, ModelError
from polarocc.features.store import FeatureStore
from polarocc.training.progress import ImagesSeen


def variant_artefact(params: Params, norm: float, distribution: str, dataset: str, category: str,
                     device: str = "cpu", progress: bool = False) -> ModelArtefact:
    """The model file's content for one Protocol B variant after `dvc repro` trained it.

    With ``deploy.holdout`` > 0 the file's projector is trained again, in the same way, on the category's
    training images minus a seeded held-out fraction, whose scores set the threshold (images the model never
    saw); the sweep's variant, trained on every image, is what the reported metrics measure. With 0 it is the
    sweep's variant and its threshold comes from its own training images' (lower) scores.
    """
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
    store = FeatureStore(layout.feature_store(params, dataset, category))
    projector, center, meta = load_model(layout.model_file(params, norm, distribution, dataset, category), store)
    provenance = {"protocol": meta["protocol"], "dataset": dataset, "category": category,
                  "distribution": distribution, "norm": norm}
    n_train = store.features("train").shape[0]
    held = held_out_rows(n_train, params.deploy.holdout, params.train.seed)
    if not len(held):
        return build_artefact(projector, center, store, params, {**meta["train"], "history": meta["history"]},
                              provenance, device)
    kept = np.setdiff1d(np.arange(n_train), held)
    with tqdm(total=len(kept) * params.train.epochs, desc=f"  {category} without the held-out images", unit="image",
              unit_scale=True, leave=False, disable=not progress) as bar:
        [(projector, center, history)] = fit_store(store, params, norm, (distribution,), rows=kept,
                                                   on_step=ImagesSeen(bar, [distribution])).values()
    train = {**vars(params.train), "history": history.to_dict()}
    provenance.update(trained_on=len(kept), held_out=len(held))
    return build_artefact(projector, center, store, params, train, provenance, device, held_out=held)


def export_variant(params: Params, norm: float, distribution: str, dataset: str, category: str,
                   out: Path | None = None, device: str = "cpu", progress: bool = False) -> Path:
    """Save one trained Protocol B variant as a model file (default: models/deploy/<dataset>/<category>.pt);
    see :func:`variant_artefact`."""
    target = out or layout.deploy_model(params, dataset, category)
    check_model_target(target)
    return save_artefact(target, variant_artefact(params, norm, distribution, dataset, category, device, progress))


def run_export(params: Params, progress: bool = True) -> list[Path]:
    """Save the default center variant of every Protocol B category."""
    device = pick_device(params.score.device, "score.device")
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    layout.deploy_dir(params).mkdir(parents=True, exist_ok=True)  # the stage's output, empty without Protocol B
    return [export_variant(params, params.center.norm, params.center.distribution, dataset, category,
                           device=device, progress=progress)
            for dataset, category in tqdm(jobs, desc="export", unit="model", disable=not progress)]
