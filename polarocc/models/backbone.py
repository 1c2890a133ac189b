"""A frozen timm CNN whose chosen feature levels are pooled, resized and concatenated.

Following the paper (and CFA before it): each selected level goes through a 3x3 average pool with
stride 1, is bilinearly upsampled to the first selected level's resolution and the levels are
concatenated along channels, e.g. Wide-ResNet50 layers 1-3 -> 1792 x 56 x 56 at 224 input.

Pretrained weights are checked strictly against timm's full classifier network before the feature levels
are taken from them, so a file for another architecture fails with the keys that do not fit.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from polarocc.errors import ConfigError, WeightsError
from polarocc.models.weights import (
    HUB,
    PACKAGE,
    UNTRAINED,
    check_weights_available,
    read_state_dict,
    seeded_init,
    warn_not_pretrained,
    weights_path,
)

if TYPE_CHECKING:
    from polarocc.config import BackboneConfig


class MultiScaleAggregator(nn.Module):
    """Average-pool each level, upsample all to the first level's size, concatenate."""

    def __init__(self, pool: int = 3) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, levels: list[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
        """The concatenated levels, in ``dtype`` (default: the levels' own).

        Each level is written straight into its channels of the output, converted as it is copied: the same values
        as ``torch.cat(...).to(dtype)`` (one rounding of the same float32 numbers) without the float32
        concatenation, which for a float16 store is twice the size of the result.
        """
        first = levels[0]
        size = first.shape[-2:]
        out = first.new_empty((first.shape[0], sum(level.shape[1] for level in levels), *size),
                              dtype=dtype or first.dtype)
        start = 0
        for level in levels:
            if self.pool > 1:
                level = F.avg_pool2d(level, self.pool, stride=1, padding=self.pool // 2)
            if level.shape[-2:] != size:
                level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
            out[:, start:start + level.shape[1]].copy_(level)
            start += level.shape[1]
        return out


@dataclass(frozen=True)
class FeatureSpec:
    """What the extractor produces: channels, spatial size and normalisation."""

    channels: int
    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def backbone_record(b: BackboneConfig, spec: FeatureSpec) -> dict:
    """How a store's (or a model's) features were made (the ``backbone`` params), with the normalisation the
    extractor actually applies."""
    return {**asdict(b), "layers": list(b.layers), "mean": list(spec.mean), "std": list(spec.std)}


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
        self._shapes: dict[tuple[int, int], tuple[int, int, int]] = {}  # spec's dry runs, per input size

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> float NCHW normalised with the model's mean/std."""
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Aggregated features (B, C, H, W), in ``dtype`` if given (rounded once, as the float32 result would be)."""
        return self.compute(images, dtype)

    def compute(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`forward` outside inference mode, which a tracer (the ONNX export) cannot record."""
        return self.aggregate(self.backbone(self.normalize(images)), dtype)

    @torch.inference_mode()
    def raw_forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's levels without aggregation (benchmark baseline)."""
        return self.backbone(self.normalize(images))

    def spec(self, size: int | tuple[int, int]) -> FeatureSpec:
        """Output shape for an input of ``size`` (a square side or (height, width)), measured by one forward of a
        black image (cached per size): padding and rounding differ between models, so a prediction from strides
        can be off by one."""
        height, width = as_size(size)
        if (height, width) not in self._shapes:
            with torch.inference_mode():
                out = self(torch.zeros(1, height, width, 3, dtype=torch.uint8, device=self.mean.device))
            self._shapes[height, width] = tuple(out.shape[1:])
        channels, out_h, out_w = self._shapes[height, width]
        return FeatureSpec(channels, out_h, out_w, tuple(self.mean.flatten().tolist()),
                           tuple(self.std.flatten().tolist()))


def as_size(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """(height, width) of a square side or a pair."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_model_name(name: str) -> None:
    """ConfigError naming ``backbone.name`` (with close matches) when timm has no model called ``name``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise ConfigError(
            f"params key 'backbone.name': timm has no model named {name!r}"
            + (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()")
        )


def _feature_levels(name: str) -> int:
    """How many feature levels timm's ``name`` offers, from an unweighted model's ``feature_info``."""
    import timm

    try:  # parameters on the meta device allocate nothing, so even huge models are instant
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
    except Exception:  # some models compute values at init that the meta device cannot give
        model = timm.create_model(name, pretrained=False)
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(f"params key 'backbone.name': timm's {name!r} cannot return feature maps; choose a CNN "
                          "such as tf_efficientnet_lite0 or wide_resnet50_2")
    return len(info)


def check_layers(name: str, layers: tuple[int, ...]) -> None:
    """ConfigError naming ``backbone.layers`` (or ``backbone.name``) unless every index is one of the model's
    feature levels; loads no weights."""
    check_model_name(name)
    count = _feature_levels(name)
    if not layers or any(not 0 <= i < count for i in layers):
        raise ConfigError(f"params key 'backbone.layers': {list(layers)} is out of range for {name}, which has "
                          f"feature levels 0..{count - 1}")


def _keys(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier head: unused by polarocc (features and pre-logits only)."""
    head = model.pretrained_cfg.get("classifier") or ()
    return tuple(f"{h}." for h in ((head,) if isinstance(head, str) else head))


def _mismatches(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], head: tuple[str, ...]) -> list[str]:
    """What keeps ``state`` from loading into a model whose state dict is ``own``; the classifier ``head`` (never
    used: features are read before it) may be missing, extra or of another shape."""
    own = {k: v for k, v in own.items() if not (head and k.startswith(head))}
    state = {k: v for k, v in state.items() if not (head and k.startswith(head))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    return [f"{label} {_keys(keys)}" for label, keys in
            (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes for", resized)) if keys]


def _misfit_error(path: Path, name: str, problems: list[str]) -> WeightsError:
    return WeightsError(f"backbone.weights: {path} does not fit timm's {name!r}: {'; '.join(problems)}. Give "
                        f"weights saved from timm.create_model({name!r}).state_dict(), or fix backbone.name")


def _fit(model: nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    """Load ``state`` into the full ``model``; WeightsError naming ``path`` and the keys that do not fit."""
    head = _head_prefixes(model)
    everything = model.state_dict()
    problems = _mismatches(everything, state, head)
    if problems:
        raise _misfit_error(path, name, problems)
    # A head that fits is loaded too (the pooled extractor keeps it); one that does not is left out.
    loadable = {k: v for k, v in state.items()
                if not (head and k.startswith(head)) or (k in everything and v.shape == everything[k].shape)}
    result = model.load_state_dict(loadable, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if not k.startswith(head)]


def check_weights(name: str, weights: str) -> None:
    """Before any work: the weights ``backbone.weights`` names exist and, for a local file, fit ``name`` key by key
    and shape by shape (checked against a weightless model on the meta device; nothing is downloaded)."""
    import timm

    check_weights_available(name, weights)
    if weights in (HUB, PACKAGE, *UNTRAINED):  # the package holds Lite0's own weights (checked by name above)
        return
    path = Path(weights).expanduser()
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    problems = _mismatches(model.state_dict(), read_state_dict(path), _head_prefixes(model))
    if problems:
        raise _misfit_error(path, name, problems)


def _full_model(name: str, weights: str) -> nn.Module:
    """timm's whole classifier network ``name`` with ``weights`` loaded strictly ('random'/'none': timm's
    initialisation under a fixed seed)."""
    import timm

    check_model_name(name)
    if weights in UNTRAINED:
        return seeded_init(lambda: timm.create_model(name, pretrained=False))
    path = weights_path(name, weights)
    if weights == HUB:
        try:
            return timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError) as exc:
            raise WeightsError(
                f"could not download weights for {name!r} from the hub ({exc}). Offline, set backbone.weights to "
                "a local weights file, or use backbone.name tf_efficientnet_lite0 with backbone.weights package"
            ) from exc
    model = timm.create_model(name, pretrained=False)
    if path is not None:
        _fit(model, read_state_dict(path), path, name)
    return model


def _features_model(name: str, layers: tuple[int, ...], state: dict[str, torch.Tensor] | None) -> nn.Module:
    """timm's ``features_only`` model for ``layers`` holding ``state`` (a full-model state dict; None: random)."""
    import timm

    model = timm.create_model(name, features_only=True, out_indices=layers, pretrained=False)
    if state is None:
        return model
    own = model.state_dict().keys()
    if own <= state.keys():  # the feature class keeps the full model's module names (efficientnet, resnet)
        model.load_state_dict({k: state[k] for k in own}, strict=True)
        return model
    # A wrapper that renames modules (e.g. FeatureListNet with flatten_sequential, convnext): timm loads the
    # state into the full network before wrapping it. It pops head keys from the dict it is given: pass a copy.
    model = timm.create_model(name, features_only=True, out_indices=layers, pretrained=True,
                              pretrained_cfg_overlay={"state_dict": dict(state)})
    model.pretrained_cfg.pop("state_dict", None)  # timm keeps a deep copy of the weights there
    return model


def build_extractor(name: str, layers: tuple[int, ...], pool: int = 3, weights: str = "package",
                    mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                    warn: bool = True) -> FeatureExtractor:
    """Create the frozen extractor; ``weights`` is 'package', 'hub', a file path or 'random' (alias 'none': seeded
    random initialisation, benchmark only; warns once per process unless ``warn`` is false)."""
    layers = tuple(layers)
    check_layers(name, layers)
    if weights in UNTRAINED:
        if warn:
            warn_not_pretrained(name)
        backbone = seeded_init(lambda: _features_model(name, layers, None))
    else:
        backbone = _features_model(name, layers, _full_model(name, weights).state_dict())
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

    def spec(self, size: int | tuple[int, int]) -> FeatureSpec:
        """C x 1 x 1, C = the model's pooled feature width (1280 for Lite0, 2048 for ResNet152)."""
        return FeatureSpec(int(self.backbone.num_features), 1, 1, tuple(self.mean.flatten().tolist()),
                           tuple(self.std.flatten().tolist()))


def build_pooled_extractor(name: str, weights: str = "package", mean: tuple[float, ...] | None = None,
                           std: tuple[float, ...] | None = None, warn: bool = True) -> PooledExtractor:
    """The whole frozen classifier network, read out before its last linear layer ('random': see
    :func:`build_extractor`)."""
    model = _full_model(name, weights)
    if weights in UNTRAINED and warn:
        warn_not_pretrained(name)
    cfg = model.pretrained_cfg
    return PooledExtractor(model, tuple(mean or cfg.get("mean")), tuple(std or cfg.get("std")))
