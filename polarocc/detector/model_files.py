"""Files of trained variants: the pipeline's per-variant model files (projector, center, provenance) and the
self-describing model files (:class:`polarocc.detector.artefact.ModelArtefact`) made from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from polarocc.atomic import torch_save_atomic
from polarocc.config import Params
from polarocc.detector.artefact import ModelArtefact, score_settings
from polarocc.detector.stores import score_store
from polarocc.detector.threshold import quantile_threshold
from polarocc.errors import MissingOutputError, ModelError
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.safe_load import torch_load_plain


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
