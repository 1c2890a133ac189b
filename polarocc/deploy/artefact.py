"""One self-describing file per trained variant: everything needed to score new images without retraining.

The file records the projector, the center, how features were made (backbone name, weights source, layers,
pooling, normalisation, input geometry, feature shape), how maps become scores (smoothing, reduction), the
decision threshold with the rule that produced it, the normal training scores it came from, where the model
came from and the library versions that wrote it.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from polarocc.atomic import torch_save_atomic
from polarocc.config import ScoreConfig
from polarocc.errors import ModelError
from polarocc.models.projector import Projector

FORMAT = "polarocc-model"
FORMAT_VERSION = 1
# What makes two feature extractors interchangeable; anything else (device, batch size) does not matter.
BACKBONE_KEYS = ("name", "weights", "layers", "pool", "mean", "std")
GEOMETRY_KEYS = ("resize", "crop")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine a saved model's numbers."""
    import numpy
    import timm

    import polarocc

    return {"polarocc": str(polarocc.__version__), "torch": str(torch.__version__), "timm": str(timm.__version__),
            "numpy": str(numpy.__version__), "python": platform.python_version()}


@dataclass
class Threshold:
    """The image-score threshold above which an image is called anomalous, and how it was chosen.

    ``rule`` is ``quantile`` (that quantile of the normal training scores), ``user`` (given explicitly) or
    ``radius`` (the paper's d > R; every image exceeds it in practice, see the README).
    """

    value: float
    rule: str
    quantile: float | None = None

    def describe(self) -> str:
        """A short human-readable form."""
        if self.rule == "quantile":
            return f"{self.value:.6g} (quantile {self.quantile:g} of normal training scores)"
        return f"{self.value:.6g} ({self.rule})"


@dataclass
class ModelArtefact:
    """A trained projector with everything needed to use it on new images."""

    projector: dict[str, Any]
    center: torch.Tensor
    backbone: dict[str, Any]
    geometry: dict[str, int]
    feature_shape: tuple[int, int, int]
    score: dict[str, Any]
    threshold: Threshold | None
    normal_scores: list[float] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)

    def build_projector(self, dtype: torch.dtype = torch.float32) -> Projector:
        """The trained projector as a module."""
        return Projector.from_state(self.projector, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The payload written to disk."""
        payload = asdict(self)
        payload["threshold"] = None if self.threshold is None else asdict(self.threshold)
        payload["feature_shape"] = list(self.feature_shape)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}

    def check_features(self, backbone: dict[str, Any], geometry: dict[str, Any], source: str) -> None:
        """Fail when features from ``source`` (described by ``backbone`` and ``geometry``) differ from the
        ones this model was trained on."""
        wrong = [f"backbone.{k}: model {self.backbone.get(k)!r}, {source} {backbone.get(k)!r}"
                 for k in BACKBONE_KEYS if _same(self.backbone.get(k)) != _same(backbone.get(k))]
        wrong += [f"geometry.{k}: model {self.geometry.get(k)!r}, {source} {geometry.get(k)!r}"
                  for k in GEOMETRY_KEYS if self.geometry.get(k) != geometry.get(k)]
        if wrong:
            raise ModelError(f"the model was trained on other features than {source}: " + "; ".join(wrong)
                             + ". Score with the backbone and geometry the model records, or retrain")

    def check_feature_shape(self, shape: tuple[int, ...], source: str) -> None:
        """Fail when an extractor or store yields features of another (C, H, W) than the model's."""
        if tuple(shape) != tuple(self.feature_shape):
            raise ModelError(f"{source} produces features of shape {tuple(shape)} but the model expects "
                             f"{tuple(self.feature_shape)}: backbone, layers or input geometry differ")


def score_settings(cfg: ScoreConfig) -> dict[str, Any]:
    """What a model file records of the ``score`` params: how maps become scores, not where they were
    computed or how the test metrics were accumulated."""
    return {k: v for k, v in vars(cfg).items() if k not in ("device", "metrics_memory_mb")}


def _same(value: Any) -> Any:
    # Lists and tuples of the same numbers describe the same setting (JSON/YAML round trips change the type).
    return [float(v) for v in value] if isinstance(value, list | tuple) else value


def save_artefact(path: Path | str, artefact: ModelArtefact) -> Path:
    """Write the artefact atomically (a crash leaves the previous file intact)."""
    return torch_save_atomic(artefact.to_dict(), path)


def load_artefact(path: Path | str) -> ModelArtefact:
    """Read a saved model, checking that it is one and that its parts agree with each other."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no saved model at {path}: run `dvc repro` (models/deploy, models/online) or "
                         "`polarocc export`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise ModelError(f"cannot read {path} as a polarocc model ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not a polarocc model file (a training checkpoint? export it with "
                         "`polarocc export`)")
    if payload["format_version"] > FORMAT_VERSION:
        raise ModelError(f"{path} has model format {payload['format_version']}, newer than this polarocc "
                         f"reads ({FORMAT_VERSION}); upgrade polarocc")
    threshold = payload["threshold"]
    artefact = ModelArtefact(
        projector=payload["projector"], center=payload["center"], backbone=payload["backbone"],
        geometry=payload["geometry"], feature_shape=tuple(payload["feature_shape"]), score=payload["score"],
        threshold=None if threshold is None else Threshold(**threshold), normal_scores=payload["normal_scores"],
        train=payload["train"], provenance=payload["provenance"], versions=payload["versions"])
    channels = artefact.feature_shape[0]
    if tuple(artefact.projector["weight"].shape) != (channels, channels) or artefact.center.numel() != channels:
        raise ModelError(f"{path} is inconsistent: projector {tuple(artefact.projector['weight'].shape)}, center "
                         f"{artefact.center.numel()}, features {channels} channels")
    return artefact
