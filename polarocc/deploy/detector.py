"""A saved model put to work: frozen backbone + trained projector, from uint8 images to maps and scores."""

from __future__ import annotations

import numpy as np
import torch

from polarocc.data.images import Geometry
from polarocc.detector.artefact import ModelArtefact
from polarocc.models.backbone import FeatureExtractor, build_extractor
from polarocc.scoring.maps import score_batch


def build_model_extractor(artefact: ModelArtefact) -> FeatureExtractor:
    """The feature extractor the artefact records (its weights source must be reachable here)."""
    b = artefact.backbone
    return build_extractor(b["name"], tuple(b["layers"]), int(b["pool"]), str(b["weights"]),
                           tuple(b["mean"]) if b.get("mean") else None, tuple(b["std"]) if b.get("std") else None)


class Detector:
    """Scores images with a saved model; ``extractor`` may be passed in to share an already built backbone.

    A passed-in extractor must be built like the model's (same name, weights, layers, pooling and
    normalisation) and produce the feature shape the model was trained on.
    """

    def __init__(self, artefact: ModelArtefact, device: str = "cpu", extractor: FeatureExtractor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.artefact = artefact
        self.device = device
        self.geometry = Geometry(int(artefact.geometry["resize"]), int(artefact.geometry["crop"]))
        if extractor is not None and extractor.description is not None:
            artefact.check_features(extractor.description, artefact.geometry, "the given extractor")
        self.extractor = (extractor or build_model_extractor(artefact)).to(device)
        spec = self.extractor.spec(self.geometry.crop)
        artefact.check_feature_shape((spec.channels, spec.height, spec.width), f"backbone {artefact.backbone['name']}")
        self.projector = artefact.build_projector(dtype).to(device)
        self.center = artefact.center.to(device=device, dtype=dtype)

    def features(self, images: np.ndarray) -> torch.Tensor:
        """Frozen features (B, C, H, W) of uint8 RGB images (B, crop, crop, 3), on the detector's device."""
        pixels = np.require(images, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"])
        return self.extractor(torch.from_numpy(pixels).to(self.device)).float()

    def score_features(self, features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly maps (B, crop, crop) float32, image scores (B,) float64) of a feature batch."""
        s = self.artefact.score
        maps, scores = score_batch(self.projector, self.center, features.to(self.device), self.geometry.crop,
                                   float(s["sigma"]), str(s["reduction"]), int(s["topk"]), bool(s["squared"]))
        return maps.float().cpu().numpy(), scores.double().cpu().numpy()

    def score(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(maps, scores) of uint8 RGB images (B, crop, crop, 3)."""
        return self.score_features(self.features(images))
