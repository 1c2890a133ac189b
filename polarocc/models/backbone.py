"""A frozen timm CNN whose chosen feature levels are pooled, resized and concatenated.

Following the paper (and CFA before it): each selected level goes through a 3x3 average pool with
stride 1, is bilinearly upsampled to the first selected level's resolution and the levels are
concatenated along channels, e.g. Wide-ResNet50 layers 1-3 -> 1792 x 56 x 56 at 224 input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from polarocc.errors import ConfigError, WeightsError
from polarocc.models.weights import resolve_weights


class MultiScaleAggregator(nn.Module):
    """Average-pool each level, upsample all to the first level's size, concatenate."""

    def __init__(self, pool: int = 3) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, levels: list[torch.Tensor]) -> torch.Tensor:
        size = levels[0].shape[-2:]
        out = []
        for level in levels:
            if self.pool > 1:
                level = F.avg_pool2d(level, self.pool, stride=1, padding=self.pool // 2)
            if level.shape[-2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            out.append(level)
        return torch.cat(out, dim=1)


@dataclass(frozen=True)
class FeatureSpec:
    """What the extractor produces: channels, spatial size and normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class FeatureExtractor(nn.Module):
    """Frozen timm backbone + multi-scale aggregation; takes uint8-range-normalised RGB batches."""

    def __init__(self, backbone: nn.Module, pool: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.aggregate = MultiScaleAggregator(pool)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        # How it was built (name, weights, layers, pool, mean, std), so saved models can check they fit.
        self.description: dict | None = None

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW normalised with the model's mean/std."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.backbone(self.normalize(images)))

    @torch.inference_mode()
    def raw_forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels without aggregation (benchmark baseline)."""
        return self.backbone(self.normalize(images))

    def spec(self, crop: int) -> FeatureSpec:
        """Output shape for a ``crop`` x ``crop`` input, from timm's ``feature_info``."""
        info = self.backbone.feature_info
        reduction = info.reduction()[0]
        return FeatureSpec(sum(info.channels()), -(-crop // reduction), -(-crop // reduction),
                           tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))


HEAD_PREFIXES = ("conv_head.", "bn2.", "classifier.", "fc.", "head.", "global_pool.")


class _HeadKeysFilter(logging.Filter):
    """Drops timm's 'Unexpected keys' warning when only classifier-head weights were left unused, which is
    what a features-only model loading full-network weights does; any other unused key is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith("Unexpected keys ("):
            return True
        keys = message[len("Unexpected keys ("):message.index(")")].split(", ")
        return not all(k.startswith(HEAD_PREFIXES) for k in keys)


def _create(name: str, weights: str, **kwargs) -> nn.Module:
    import timm

    builder_logger = logging.getLogger("timm.models._builder")
    if not any(isinstance(f, _HeadKeysFilter) for f in builder_logger.filters):
        builder_logger.addFilter(_HeadKeysFilter())

    if not timm.is_model(name):
        raise ConfigError(f"params key 'backbone.name': timm has no model named {name!r}")
    if weights == "none":
        pretrained, overlay = False, {}
    else:
        pretrained, overlay = resolve_weights(name, weights)
    try:
        return timm.create_model(name, pretrained=pretrained, pretrained_cfg_overlay=overlay or None, **kwargs)
    except IndexError as exc:
        raise ConfigError(f"params key 'backbone.layers': {kwargs.get('out_indices')} is out of range for {name}") \
            from exc
    except (OSError, RuntimeError) as exc:
        if weights == "hub":
            raise WeightsError(
                f"could not download weights for {name!r} from the hub ({exc}). Offline, set backbone.weights to "
                "a local weights file, or use backbone.name tf_efficientnet_lite0 with backbone.weights package"
            ) from exc
        raise WeightsError(f"could not load weights {weights!r} into {name!r}: {exc}") from exc


def build_extractor(name: str, layers: tuple[int, ...], pool: int = 3, weights: str = "package",
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None) -> FeatureExtractor:
    """Create the frozen extractor; ``weights`` is 'package', 'hub', 'none' (random) or a file path."""
    backbone = _create(name, weights, features_only=True, out_indices=tuple(layers))
    cfg = backbone.pretrained_cfg
    extractor = FeatureExtractor(backbone, pool, tuple(mean or cfg.get("mean")), tuple(std or cfg.get("std")))
    extractor.description = {"name": name, "weights": str(weights), "layers": list(layers), "pool": pool,
                             "mean": extractor.mean.flatten().tolist(), "std": extractor.std.flatten().tolist()}
    return extractor


class PooledExtractor(FeatureExtractor):
    """Protocol A: the penultimate features (global-average-pooled, before the classifier) as (N, C, 1, 1)."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__(model, 1, mean, std)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.backbone.forward_features(self.normalize(images))
        return self.backbone.forward_head(x, pre_logits=True)[:, :, None, None]

    def spec(self, crop: int) -> FeatureSpec:
        """C x 1 x 1, C = the model's pooled feature width (1280 for Lite0, 2048 for ResNet152)."""
        return FeatureSpec(int(self.backbone.num_features), 1, 1, tuple(self.mean.flatten().tolist()),
                           tuple(self.std.flatten().tolist()))


def build_pooled_extractor(name: str, weights: str = "package", mean: tuple[float, ...] | None = None,
                           std: tuple[float, ...] | None = None) -> PooledExtractor:
    """The whole frozen classifier network, read out before its last linear layer."""
    model = _create(name, weights)
    cfg = model.pretrained_cfg
    return PooledExtractor(model, tuple(mean or cfg.get("mean")), tuple(std or cfg.get("std")))
