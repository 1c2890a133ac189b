"""``polarocc.Detector``: the method as one object, for notebooks, the CLI and the pipeline's model files.

Fit on a folder (or paths, PIL images, arrays) of normal images: frozen backbone features, one projector trained
with the exact statistics trainer the pipeline uses (:func:`polarocc.training.fit.fit_projectors`), a decision
threshold calibrated on normal images held out of training. Then score, map and predict new images of any size,
and save/load the model as one self-describing file (tensors and plain data only, read with
``weights_only=True``).

    detector = Detector(epochs=50).fit("bottle/train/good")
    detector.predict("bottle/test")          # array of bools, one per image (folders are read recursively)
    detector.save("bottle.pt"); Detector.load("bottle.pt").anomaly_maps(image_array)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from polarocc.config import (
    BackboneConfig,
    CenterConfig,
    DeployConfig,
    ExtractConfig,
    ProjectorConfig,
    ScoreConfig,
    TrainConfig,
    build_section,
)
from polarocc.detector.artefact import ModelArtefact, load_artefact, save_artefact, score_settings
from polarocc.detector.images import SourceImage, as_images, batches, map_to_image
from polarocc.detector.model_files import calibrate, float32_copy
from polarocc.detector.threshold import held_out_rows
from polarocc.device import pick_device
from polarocc.errors import ConfigError, ModelError
from polarocc.features.budget import STREAMED
from polarocc.geometry import Geometry, GeometrySpec
from polarocc.models.backbone import FeatureExtractor, backbone_record, build_extractor
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.models.tiling import TiledExtractor, for_geometry
from polarocc.scoring.maps import score_batch
from polarocc.training.fit import TrainingFeatures, fit_projectors

TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _config(cls: type, values: dict[str, Any], names: dict[str, str] | None = None) -> Any:
    """``cls`` from Detector parameters, checked like params.yaml; ``names`` maps a field to the parameter it
    comes from where they differ, so an error names what the user wrote."""
    try:
        return build_section(cls, {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}, "",
                             "Detector parameter")
    except ConfigError as exc:
        message = str(exc)
        for field_name, parameter in (names or {}).items():
            message = message.replace(f"'{field_name}'", f"'{parameter}'").replace(f"'{field_name}[", f"'{parameter}[")
        raise ConfigError(message) from None


def _resolve_geometry(backbone: BackboneConfig, first: SourceImage) -> Geometry:
    """The model input geometry for the Detector's parameters; an aspect-preserving resize takes the first image's
    aspect ratio (every image is then resized to that size)."""
    spec = GeometrySpec.parse(backbone.resize, backbone.crop, backbone.tiles, prefix="", label="Detector parameter")
    if spec.fixed:
        return spec.resolve()
    height, width = first.rgb().shape[:2]
    return spec.resolve((height, width), f"the first image ({height}x{width}, height x width)")


def _build_model_extractor(artefact: ModelArtefact) -> FeatureExtractor:
    """The feature extractor a model records (its weights source must be reachable here)."""
    b = artefact.backbone
    return build_extractor(b["name"], tuple(b["layers"]), int(b["pool"]), str(b["weights"]),
                           tuple(b["mean"]) if b.get("mean") else None, tuple(b["std"]) if b.get("std") else None)


class Detector:
    """Anomaly detector trained on normal images only: ``fit`` / ``score`` / ``anomaly_maps`` / ``predict`` /
    ``save`` / ``load``, with the paper's settings as defaults (Protocol B: 50 epochs, batch 16, Adam lr 1e-4,
    weight decay 5e-4, R = 1e-5, a N(0, 1) center of norm 1 drawn with seed 1024, a 1x1 conv projector with
    bias, maps smoothed with sigma 4, image score = max of the map).

    The default backbone is the offline EfficientNet-Lite0 (layers 1-3, 176 channels); the paper's is
    ``backbone="wide_resnet50_2", weights="hub"`` (or a local weights file), layers 1-3, 1792 channels.
    Parameters are checked when ``fit`` runs, each error naming the parameter. ``holdout`` (a fraction of
    the normal images, seeded) is left out of training and sets the threshold at its ``quantile``: with 0, the
    training images' own scores set it (lower, so more normal images are flagged).
    """

    def __init__(self, *, backbone: str = BackboneConfig.name, weights: str = BackboneConfig.weights,
                 layers: tuple[int, ...] = BackboneConfig.layers, pool: int = BackboneConfig.pool,
                 resize: int | tuple[int, int] | dict[str, int] = BackboneConfig.resize,
                 crop: int | tuple[int, int] | None = BackboneConfig.crop, tiles: dict[str, Any] | None = None,
                 mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
                 center: str = CenterConfig.distribution, norm: float = CenterConfig.norm,
                 seed: int = CenterConfig.seed, projector: str = ProjectorConfig.kind,
                 bias: bool = ProjectorConfig.bias, trainer: str = TrainConfig.trainer,
                 epochs: int = TrainConfig.epochs, batch_size: int = TrainConfig.batch_size, lr: float = TrainConfig.lr,
                 weight_decay: float = TrainConfig.weight_decay, radius: float = TrainConfig.radius,
                 train_seed: int = TrainConfig.seed, sigma: float = ScoreConfig.sigma,
                 reduction: str = ScoreConfig.reduction, topk: int = ScoreConfig.topk,
                 squared: bool = ScoreConfig.squared, holdout: float = DeployConfig.holdout,
                 quantile: float = DeployConfig.threshold_quantile, feature_dtype: str = ExtractConfig.dtype,
                 device: str = "auto", progress: bool = True) -> None:
        self.backbone, self.weights, self.layers, self.pool = backbone, weights, layers, pool
        self.resize, self.crop, self.tiles, self.mean, self.std = resize, crop, tiles, mean, std
        self.center, self.norm, self.seed = center, norm, seed
        self.projector, self.bias = projector, bias
        self.trainer, self.epochs, self.batch_size, self.lr = trainer, epochs, batch_size, lr
        self.weight_decay, self.radius, self.train_seed = weight_decay, radius, train_seed
        self.sigma, self.reduction, self.topk, self.squared = sigma, reduction, topk, squared
        self.holdout, self.quantile, self.feature_dtype = holdout, quantile, feature_dtype
        self.device, self.progress = device, progress
        self.artefact_: ModelArtefact | None = None
        self._extractor: FeatureExtractor | None = None
        self._model: tuple[Projector, torch.Tensor] | None = None
        self._device_: str | None = None
        self._dtype = torch.float32  # of the projector and center that score (a stream trains them in float64)

    # -- parameters -------------------------------------------------------------------------------------------
    PARAMS = ("backbone", "weights", "layers", "pool", "resize", "crop", "tiles", "mean", "std", "center", "norm",
              "seed", "projector", "bias", "trainer", "epochs", "batch_size", "lr", "weight_decay", "radius",
              "train_seed", "sigma", "reduction", "topk", "squared", "holdout", "quantile", "feature_dtype", "device",
              "progress")

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (scikit-learn convention)."""
        return {name: getattr(self, name) for name in self.PARAMS}

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.get_params().items() if v != Detector().get_params()[k]}
        return f"Detector({', '.join(f'{k}={v!r}' for k, v in changed.items())})"

    def _configs(self) -> tuple[BackboneConfig, CenterConfig, ProjectorConfig, TrainConfig, ScoreConfig,
                                DeployConfig]:
        backbone = _config(BackboneConfig, {"name": self.backbone, "weights": self.weights, "layers": self.layers,
                                            "pool": self.pool, "resize": self.resize, "crop": self.crop,
                                            "tiles": self.tiles, "mean": self.mean, "std": self.std},
                          {"name": "backbone"})
        center = _config(CenterConfig, {"distribution": self.center, "norm": self.norm, "seed": self.seed},
                         {"distribution": "center"})
        projector = _config(ProjectorConfig, {"kind": self.projector, "bias": self.bias}, {"kind": "projector"})
        train = _config(TrainConfig, {"trainer": self.trainer, "epochs": self.epochs, "batch_size": self.batch_size,
                                      "lr": self.lr, "weight_decay": self.weight_decay, "radius": self.radius,
                                      "seed": self.train_seed, "device": self.device}, {"seed": "train_seed"})
        score = _config(ScoreConfig, {"sigma": self.sigma, "reduction": self.reduction, "topk": self.topk,
                                      "squared": self.squared, "device": self.device})
        deploy = _config(DeployConfig, {"threshold_quantile": self.quantile, "holdout": self.holdout},
                         {"threshold_quantile": "quantile"})
        _config(ExtractConfig, {"dtype": self.feature_dtype}, {"dtype": "feature_dtype"})
        GeometrySpec.parse(backbone.resize, backbone.crop, backbone.tiles, prefix="", label="Detector parameter")
        return backbone, center, projector, train, score, deploy

    # -- fitting ----------------------------------------------------------------------------------------------
    def fit(self, source: Any) -> Detector:
        """Train on normal images (see :mod:`polarocc.detector.images` for what ``source`` may be); returns self.

        The images are checked first (a bad file or array stops it by name), then the backbone's features are
        computed once, the projector is trained on all but the held-out images, and the held-out images' scores
        set the threshold and the overlay colour scale.
        """
        backbone, center_cfg, projector_cfg, train, score, deploy = self._configs()
        device = pick_device(self.device, "device")
        images = as_images(source)
        held = held_out_rows(len(images), deploy.holdout, train.seed)
        geometry = _resolve_geometry(backbone, images[0])
        extractor = for_geometry(build_extractor(backbone.name, backbone.layers, backbone.pool, backbone.weights,
                                                 backbone.mean, backbone.std), geometry).to(device)
        spec = extractor.spec(geometry.size)
        features = self._extract(extractor, images, geometry, device, "features")
        trained = np.setdiff1d(np.arange(len(images)), held)
        data = TrainingFeatures.in_memory(features[trained], f"the {len(trained)} images given to fit")
        direction = make_center(center_cfg.distribution, center_cfg.norm, spec.channels, center_cfg.seed,
                                feature_mean=lambda: data.sums.sum(0) / (len(trained) * data.pixels_per_image))
        steps = tqdm(total=train.epochs * len(trained), desc="train", unit="image", disable=not self.progress)
        with steps:
            fitted = fit_projectors(data, {center_cfg.distribution: direction}, train, projector_cfg.kind,
                                    projector_cfg.bias, STREAMED, device,
                                    on_step=lambda _, seen, __: steps.update(seen - steps.n))
        projector, center, history = fitted[center_cfg.distribution]
        settings = {**score_settings(score), "feature_dtype": self.feature_dtype}
        threshold, normal_scores, scale = calibrate(
            float32_copy(projector), center, features[held if len(held) else trained], geometry.size, settings,
            deploy.threshold_quantile, bool(len(held)), device)
        self.artefact_ = ModelArtefact(
            projector=float32_copy(projector).state(), center=center.detach().cpu().to(torch.float64),
            backbone=backbone_record(backbone, spec), geometry=geometry.record(),
            feature_shape=(spec.channels, spec.height, spec.width), score=settings, threshold=threshold,
            normal_scores=[float(s) for s in normal_scores],
            train={**vars(train), "history": history.to_dict()},
            provenance={"protocol": "Detector.fit", "distribution": center_cfg.distribution,
                        "norm": float(center_cfg.norm), "images": len(images), "trained_on": len(trained),
                        "held_out": len(held),
                        **({"normal_scores": {"source": "holdout", "stream": 0, "carried": 0}} if len(held) else {})},
            map_scale=scale)
        self._extractor, self._model, self._device_ = extractor, None, device
        return self

    def _extract(self, extractor: FeatureExtractor | TiledExtractor, images: list[SourceImage], geometry: Geometry,
                 device: str, what: str) -> np.ndarray:
        """Features (N, C, H, W) in ``feature_dtype``, as the pipeline stores them."""
        dtype = TORCH_DTYPES[self.feature_dtype]
        out = []
        with tqdm(total=len(images), desc=what, unit="image", disable=not self.progress) as bar:
            for chunk, inputs, _ in batches(images, geometry, ExtractConfig.batch_size):
                out.append(extractor(torch.from_numpy(inputs).to(device), dtype=dtype).cpu().numpy())
                bar.update(len(chunk))
        return np.concatenate(out)

    # -- a fitted or loaded model ---------------------------------------------------------------------------------
    @property
    def artefact(self) -> ModelArtefact:
        """The model file's content (after ``fit`` or ``load``)."""
        if self.artefact_ is None:
            raise ModelError("this Detector is not fitted: call fit(images) or Detector.load(path) first")
        return self.artefact_

    @property
    def geometry(self) -> Geometry:
        """The model input's geometry (resize, crop, tiles) the model was trained at."""
        return self.artefact.input_geometry

    @property
    def threshold(self) -> float:
        """The image-score threshold above which :meth:`predict` calls an image anomalous."""
        if self.artefact.threshold is None:
            raise ModelError("this model has no threshold (no normal scores were recorded); pass one to predict")
        return self.artefact.threshold.value

    @property
    def extractor(self) -> FeatureExtractor | TiledExtractor:
        """The frozen backbone the model was trained on (built on first use), tiled where the model's geometry is."""
        if self._extractor is None:
            self._extractor = for_geometry(_build_model_extractor(self.artefact), self.geometry).to(self._device)
            self._check_extractor(self._extractor)
        return self._extractor

    @property
    def _device(self) -> str:
        if self._device_ is None:
            self._device_ = pick_device(self.device, "device")
        return self._device_

    @property
    def _parts(self) -> tuple[Projector, torch.Tensor]:
        if self._model is None:
            projector = self.artefact.build_projector(self._dtype).to(self._device)
            self._model = (projector, self.artefact.center.to(device=self._device, dtype=self._dtype))
        return self._model

    @property
    def projector_(self) -> Projector:
        """The trained projector (float32 on the detector's device, unless loaded otherwise)."""
        return self._parts[0]

    @property
    def center_(self) -> torch.Tensor:
        """The hypersphere center, like :attr:`projector_`."""
        return self._parts[1]

    def _check_extractor(self, extractor: FeatureExtractor | TiledExtractor) -> None:
        if extractor.description is not None:
            self.artefact.check_features(extractor.description, self.artefact.geometry, "the given extractor")
        spec = extractor.spec(self.geometry.size)
        self.artefact.check_feature_shape((spec.channels, spec.height, spec.width),
                                          f"backbone {self.artefact.backbone['name']}")

    @classmethod
    def from_artefact(cls, artefact: ModelArtefact, device: str = "auto",
                      extractor: FeatureExtractor | None = None, progress: bool = True,
                      dtype: torch.dtype = torch.float32) -> Detector:
        """A detector for a model file's content; ``extractor`` shares an already built backbone (it must be built
        like the model's: same name, weights, layers, pooling, normalisation and feature shape). ``dtype`` is that
        of :attr:`projector_` and :attr:`center_`."""
        b, g, s, t, p = artefact.backbone, artefact.geometry, artefact.score, artefact.train, artefact.provenance
        detector = cls(backbone=b["name"], weights=b["weights"], layers=tuple(b["layers"]), pool=int(b["pool"]),
                       resize=b.get("resize", g["resize"]), crop=b.get("crop", g["crop"]),
                       tiles=b.get("tiles", g.get("tiles")), mean=b.get("mean"), std=b.get("std"),
                       sigma=s["sigma"], reduction=s["reduction"], topk=s["topk"], squared=s["squared"],
                       feature_dtype=s.get("feature_dtype", "float32"), device=device, progress=progress)
        for name, key, source in (("center", "distribution", p), ("norm", "norm", p), ("lr", "lr", t),
                                  ("weight_decay", "weight_decay", t), ("radius", "radius", t),
                                  ("epochs", "epochs", t), ("batch_size", "batch_size", t)):
            if key in source:
                setattr(detector, name, source[key])
        detector.artefact_ = artefact
        detector._dtype = dtype
        if extractor is not None:
            # The plain backbone, tiled as the model was trained (a given tiled one may cut other tiles).
            extractor = for_geometry(extractor.inner if isinstance(extractor, TiledExtractor) else extractor,
                                     detector.geometry)
            detector._extractor = extractor.to(detector._device)
            detector._check_extractor(detector._extractor)
        return detector

    @classmethod
    def load(cls, path: Path | str, device: str = "auto", extractor: FeatureExtractor | None = None,
             progress: bool = True) -> Detector:
        """A saved model (``save``, the pipeline's models/deploy and models/online, ``polarocc fit``); every part
        is checked on reading and only tensors and plain data are read."""
        return cls.from_artefact(load_artefact(path), device, extractor, progress)

    def save(self, path: Path | str) -> Path:
        """Write the model file atomically (an existing file is replaced only when it is a polarocc model)."""
        return save_artefact(path, self.artefact)

    # -- scoring ----------------------------------------------------------------------------------------------
    def features(self, inputs: np.ndarray) -> torch.Tensor:
        """Frozen features (B, C, h, w) float32 of model inputs (B, height, width, 3) uint8 (``geometry.size``),
        rounded through the model's feature dtype as the pipeline's stores are."""
        pixels = np.require(inputs, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        dtype = TORCH_DTYPES.get(self.feature_dtype, torch.float32)
        return self.extractor(torch.from_numpy(pixels).to(self._device), dtype=dtype).float()

    def score_features(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps (B, height, width) float32 at the model input's size, image scores (B,) float64) of a
        feature batch."""
        s = self.artefact.score
        projector, center = self._parts
        maps, scores = score_batch(projector, center, features.to(self._device), self.geometry.size,
                                   float(s["sigma"]), str(s["reduction"]), int(s["topk"]), bool(s["squared"]))
        return maps.float().cpu().numpy(), scores.double().cpu().numpy()

    def score_inputs(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(maps at the model input's size, scores) of model inputs (B, height, width, 3) uint8, as
        :func:`polarocc.data.images.load_image` makes them."""
        return self.score_features(self.features(inputs))

    def score_and_maps(self, source: Any, maps: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
        """(image scores (N,), one anomaly map per image at its own size) in one pass (no maps when ``maps`` is
        False)."""
        images = as_images(source)
        scores: list[np.ndarray] = []
        full: list[np.ndarray] = []
        geometry = self.geometry
        with tqdm(total=len(images), desc="score", unit="image", disable=not self.progress) as bar:
            for chunk, inputs, originals in batches(images, geometry, ExtractConfig.batch_size):
                input_maps, input_scores = self.score_inputs(inputs)
                scores.append(input_scores)
                if maps:
                    full += [map_to_image(m, geometry, image.shape[:2])
                             for m, image in zip(input_maps, originals, strict=True)]
                bar.update(len(chunk))
        return np.concatenate(scores), full

    def score(self, source: Any) -> np.ndarray:
        """Image anomaly scores (N,) float64: higher is more anomalous."""
        return self.score_and_maps(source, maps=False)[0]

    def anomaly_maps(self, source: Any) -> list[np.ndarray]:
        """One float32 anomaly map per image, at that image's own height and width."""
        return self.score_and_maps(source)[1]

    def predict(self, source: Any, threshold: float | None = None) -> np.ndarray:
        """Per image, whether its score exceeds the threshold (the calibrated one unless ``threshold`` is given)."""
        return self.score(source) > (self.threshold if threshold is None else float(threshold))
