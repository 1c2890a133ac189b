"""One self-describing file per trained variant: everything needed to score new images without retraining.

The file records the projector, the center, how features were made (backbone name, weights source, layers,
pooling, normalisation, input geometry, feature shape), how maps become scores (smoothing, reduction), the
decision threshold with the rule that produced it, the normal scores it came from (the training images', or
for a stream model its window, as ``provenance["normal_scores"]`` says), where the model came from and the
library versions that wrote it. Loading validates every part (keys, types, finite numbers, shapes) and names
the file and the key on failure; an existing file is overwritten only when it is a polarocc model.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from polarocc.atomic import torch_save_atomic
from polarocc.config import ScoreConfig
from polarocc.errors import ConfigError, ModelError, UnsafePathError
from polarocc.geometry import Geometry
from polarocc.models.projector import Projector
from polarocc.safe_load import torch_load_plain

FORMAT = "polarocc-model"
FORMAT_VERSION = 2  # 2: optional map_scale (overlay colours) and the holdout_quantile threshold rule
# What makes two feature extractors interchangeable; anything else (device, batch size) does not matter.
BACKBONE_KEYS = ("name", "weights", "layers", "pool", "mean", "std")
GEOMETRY_KEYS = ("resize", "crop", "tiles")


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

    ``rule`` is ``quantile`` (that quantile of the normal training scores), ``holdout_quantile`` (that quantile of
    the scores of ``window`` normal images held out of training), ``stream_quantile`` (that quantile
    of the scores of the last ``window`` images a stream learned from, ``carried`` of them carried over from
    the starting model's normal scores), ``user`` (given explicitly) or ``radius`` (the paper's d > R; every
    image exceeds it in practice, see the README).
    """

    value: float
    rule: str
    quantile: float | None = None
    window: int | None = None
    carried: int | None = None

    def describe(self) -> str:
        """A short human-readable form."""
        if self.rule == "quantile":
            return f"{self.value:.6g} (quantile {self.quantile:g} of normal training scores)"
        if self.rule == "holdout_quantile":
            return (f"{self.value:.6g} (quantile {self.quantile:g} of the scores of {self.window} normal images held "
                    "out of training)")
        if self.rule == "stream_quantile":
            window, carried = self.window or 0, self.carried or 0
            if not carried:
                return (f"{self.value:.6g} (quantile {self.quantile:g} of the scores of the last {window} images "
                        "learned from the stream)")
            return (f"{self.value:.6g} (quantile {self.quantile:g} of the last {window} normal scores: "
                    f"{window - carried} of images learned from the stream, {carried} carried over from the "
                    "starting model's normal scores)")
        return f"{self.value:.6g} ({self.rule})"

    def to_dict(self) -> dict[str, Any]:
        """The payload written to disk; ``window``/``carried`` only where set, so files with the other rules
        keep the exact layout earlier polarocc versions read."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in ("window", "carried")}


@dataclass
class ModelArtefact:
    """A trained projector with everything needed to use it on new images."""

    projector: dict[str, Any]
    center: torch.Tensor
    backbone: dict[str, Any]
    geometry: dict[str, Any]  # Geometry.record(): resize, crop (null: none), tiles (only when tiled)
    feature_shape: tuple[int, int, int]
    score: dict[str, Any]
    threshold: Threshold | None
    normal_scores: list[float] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    # Overlay colour scale (low, high) on the map scale: percentiles of normal images' anomaly-map pixels.
    map_scale: list[float] | None = None

    @property
    def input_geometry(self) -> Geometry:
        """The model input geometry the model was trained at (maps come out at its ``size``)."""
        return Geometry.from_record(self.geometry)

    def build_projector(self, dtype: torch.dtype = torch.float32) -> Projector:
        """The trained projector as a module."""
        return Projector.from_state(self.projector, dtype=dtype)

    def to_dict(self) -> dict[str, Any]:
        """The payload written to disk."""
        payload = asdict(self)
        payload["threshold"] = None if self.threshold is None else self.threshold.to_dict()
        payload["feature_shape"] = list(self.feature_shape)
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}

    def normal_scores_origin(self) -> dict[str, Any] | None:
        """Where :attr:`normal_scores` came from when they are not the normal training images' scores: for a
        stream model ``{"source": "stream", "stream": K, "carried": C}`` (K scores of images learned from the
        stream, C carried over from the starting model); None for the training images."""
        origin = self.provenance.get("normal_scores")
        return origin if isinstance(origin, dict) else None

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


def is_model_file(path: Path | str) -> bool:
    """True when ``path`` is a file that reads as a polarocc model payload (format key), even a damaged one."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        payload = torch_load_plain(path, ModelError, "a polarocc model", "")
    except ModelError:
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def check_model_target(path: Path | str) -> None:
    """Fail unless a model file may be written at ``path``: nothing is there yet, or a polarocc model file is
    (polarocc never overwrites files it did not create). Call it before the work that makes the model."""
    path = Path(path)
    if (path.exists() or path.is_symlink()) and not is_model_file(path):
        what = "a folder" if path.is_dir() else "a file that is not a polarocc model"
        raise UnsafePathError(f"{path} exists and is {what}; polarocc never overwrites files it did not create. "
                              "Choose another path, or remove it yourself")


def save_artefact(path: Path | str, artefact: ModelArtefact) -> Path:
    """Write the artefact atomically (a crash leaves the previous file intact), where
    :func:`check_model_target` allows."""
    check_model_target(path)
    return torch_save_atomic(artefact.to_dict(), path)


_RE_EXPORT = "re-export it with `polarocc export`"


def _foreign(path: Path, detail: str) -> ModelError:
    return ModelError(f"{path} is not a polarocc model file: {detail}; {_RE_EXPORT}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_float_tensor(value: Any, dims: int | None = None) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point() and (dims is None or value.dim() == dims)


def _field(path: Path, mapping: dict, key: str, test: Callable[[Any], bool], expected: str, where: str = "") -> Any:
    """``mapping[key]`` when present and ``test`` accepts it, else an error naming the file and the key."""
    name = f"{where}{key}"
    if key not in mapping:
        raise _foreign(path, f"the key {name!r} is missing")
    value = mapping[key]
    if not test(value):
        raise _foreign(path, f"{name!r} is a {type(value).__name__}, not {expected}")
    return value


def _dict(path: Path, mapping: dict, key: str, where: str = "") -> dict:
    return _field(path, mapping, key, lambda v: isinstance(v, dict), "a dict", where)


def _threshold(path: Path, raw: Any) -> Threshold | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _foreign(path, f"'threshold' is a {type(raw).__name__}, not a dict or None")
    unknown = sorted(set(raw) - {f.name for f in fields(Threshold)})
    if unknown:
        raise _foreign(path, f"'threshold' has unknown keys {unknown}")
    value = _field(path, raw, "value", _is_number, "a number", "threshold.")
    rule = _field(path, raw, "rule", lambda v: isinstance(v, str), "a string", "threshold.")
    optional = {"quantile": (_is_number, "a number or None"), "window": (_is_int, "an integer or None"),
                "carried": (_is_int, "an integer or None")}
    extra = {key: _field(path, raw, key, test, expected, "threshold.")
             for key, (test, expected) in optional.items() if raw.get(key) is not None}
    return Threshold(float(value), rule, **extra)


def _origin(path: Path, provenance: dict) -> None:
    origin = provenance.get("normal_scores")
    if origin is None:
        return
    if not isinstance(origin, dict):
        raise _foreign(path, f"'provenance.normal_scores' is a {type(origin).__name__}, not a dict")
    _field(path, origin, "source", lambda v: isinstance(v, str), "a string", "provenance.normal_scores.")
    for key in ("stream", "carried"):
        _field(path, origin, key, lambda v: _is_int(v) and v >= 0, "a count", "provenance.normal_scores.")


def _check_finite(path: Path, artefact: ModelArtefact) -> None:
    """NaN/Inf anywhere a score is computed from or compared with makes every decision meaningless."""
    parts = {"projector weight": artefact.projector["weight"], "projector bias": artefact.projector["bias"],
             "center": artefact.center}
    bad = [name for name, tensor in parts.items() if tensor is not None and not bool(torch.isfinite(tensor).all())]
    if artefact.threshold is not None and not math.isfinite(artefact.threshold.value):
        bad.append("threshold value")
    if not all(math.isfinite(s) for s in artefact.normal_scores):
        bad.append("normal scores")
    if bad:
        raise ModelError(f"{path} holds NaN or Inf in its {', '.join(bad)}: the model cannot score images; "
                         "retrain or re-export it")


def load_artefact(path: Path | str) -> ModelArtefact:
    """Read a saved model, checking that it is one, that every part has the expected type, holds finite numbers
    and agrees with the others."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no saved model at {path}: run `dvc repro` (models/deploy, models/online) or "
                         "`polarocc export`")
    payload = torch_load_plain(path, ModelError, "a polarocc model",
                               "Point at a model file from models/deploy, models/online or `polarocc export`")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not a polarocc model file (a training checkpoint? export it with "
                         "`polarocc export`)")
    version = _field(path, payload, "format_version", lambda v: _is_int(v) and v >= 1, "a positive integer")
    if version > FORMAT_VERSION:
        raise ModelError(f"{path} has model format {version}, newer than this polarocc reads ({FORMAT_VERSION}); "
                         "upgrade polarocc")
    projector = _dict(path, payload, "projector")
    _field(path, projector, "kind", lambda v: isinstance(v, str), "a string", "projector.")
    weight = _field(path, projector, "weight", lambda v: _is_float_tensor(v, 2), "a 2-d float tensor", "projector.")
    bias = _field(path, projector, "bias", lambda v: v is None or _is_float_tensor(v, 1), "a 1-d float tensor or None",
                  "projector.")
    center = _field(path, payload, "center", _is_float_tensor, "a float tensor")
    backbone = _dict(path, payload, "backbone")
    for key in ("name", "weights"):
        _field(path, backbone, key, lambda v: isinstance(v, str), "a string", "backbone.")
    _field(path, backbone, "layers", lambda v: isinstance(v, list | tuple) and all(map(_is_int, v)),
           "a list of integers", "backbone.")
    _field(path, backbone, "pool", _is_int, "an integer", "backbone.")
    geometry = _dict(path, payload, "geometry")
    for key in ("resize", "crop"):
        _field(path, geometry, key, lambda _: True, "", "geometry.")
    try:
        Geometry.from_record(geometry)
    except ConfigError as exc:
        raise _foreign(path, f"its geometry is not valid ({exc})") from exc
    shape = _field(path, payload, "feature_shape",
                   lambda v: isinstance(v, list | tuple) and len(v) == 3 and all(_is_int(n) and n > 0 for n in v),
                   "three positive integers")
    score = _dict(path, payload, "score")
    for key, test, expected in (("sigma", _is_number, "a number"), ("reduction", lambda v: isinstance(v, str),
                                "a string"), ("topk", _is_int, "an integer"),
                                ("squared", lambda v: isinstance(v, bool), "a bool")):
        _field(path, score, key, test, expected, "score.")
    if "threshold" not in payload:
        raise _foreign(path, "the key 'threshold' is missing")
    threshold = _threshold(path, payload["threshold"])
    normal = _field(path, payload, "normal_scores", lambda v: isinstance(v, list | tuple) and all(map(_is_number, v)),
                    "a list of numbers")
    train, provenance, versions = (_dict(path, payload, key) for key in ("train", "provenance", "versions"))
    scale = payload.get("map_scale")
    if scale is not None:
        _field(path, payload, "map_scale", lambda v: isinstance(v, list | tuple) and len(v) == 2
               and all(map(_is_number, v)) and all(map(math.isfinite, v)) and v[0] < v[1],
               "two finite increasing numbers or None")
    _origin(path, provenance)
    artefact = ModelArtefact(
        projector=projector, center=center, backbone=backbone, geometry=geometry,
        feature_shape=tuple(int(n) for n in shape), score=score, threshold=threshold,
        normal_scores=[float(s) for s in normal], train=train, provenance=provenance, versions=versions,
        map_scale=None if scale is None else [float(v) for v in scale])
    channels = artefact.feature_shape[0]
    if (tuple(weight.shape) != (channels, channels) or center.numel() != channels
            or (bias is not None and bias.numel() != channels)):
        raise ModelError(f"{path} is inconsistent: projector {tuple(weight.shape)}, center "
                         f"{center.numel()}, features {channels} channels")
    _check_finite(path, artefact)
    return artefact
