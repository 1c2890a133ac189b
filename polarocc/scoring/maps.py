"""Anomaly maps: distance to the center per feature position, upsampled, smoothed, reduced."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polarocc.config import REDUCTIONS
from polarocc.models.projector import Projector


def gaussian_kernel(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1-D normalised Gaussian of radius ``round(truncate * sigma)`` (scipy's convention)."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian smoothing of (N, H, W) maps with mirror padding (scipy mode 'mirror')."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, truncate, maps.dtype).to(maps.device)
    radius = kernel.numel() // 2
    x = maps[:, None]
    # Mirror padding needs radius < size; fall back to replicate for tiny maps.
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x[:, 0]


CHUNK_BYTES = 16 * 2 ** 20  # float32 features scored at once: below a shard, so the peak does not grow with it


def chunk_images(channels: int, height: int, width: int) -> int:
    """Images whose float32 features fit :data:`CHUNK_BYTES` (at least one): what the score stage projects at
    once. Its copies (z, distances, the polar diagnostics' float64 rows) scale with this, not with the shard, so
    a test split smaller than a shard needs as much memory as a large one (Wide-ResNet50: 1 image, Lite0: 7)."""
    return max(1, CHUNK_BYTES // (channels * height * width * 4))


@torch.no_grad()
def project(projector: Projector, center: torch.Tensor, features: torch.Tensor,
            squared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(z = P(f) (N, C, h, w), ||z - c||^2 or ||z - c|| per position (N, h, w))."""
    z = projector(features.to(projector.weight.dtype))
    dist = (z - center.to(z).view(1, -1, 1, 1)).pow(2).sum(1)
    return z, dist if squared else dist.sqrt()


def distance_maps(projector: Projector, center: torch.Tensor, features: torch.Tensor,
                  squared: bool = True) -> torch.Tensor:
    """||P(f) - c||^2 (or ||.||) per feature position: (N, C, h, w) -> (N, h, w)."""
    return project(projector, center, features, squared)[1]


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of (N, h, w) maps to the model input's size (a square side or (height, width))."""
    target = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return F.interpolate(maps[:, None], size=target, mode="bilinear", align_corners=False)[:, 0]


def reduce_maps(maps: torch.Tensor, reduction: str = "max", topk: int = 10) -> torch.Tensor:
    """Image scores from (N, H, W) maps: max, mean, or mean of the ``topk`` largest pixels."""
    flat = maps.flatten(1)
    if reduction == "max":
        return flat.max(1).values
    if reduction == "mean":
        return flat.mean(1)
    if reduction == "topk":
        return flat.topk(min(topk, flat.shape[1]), dim=1).values.mean(1)
    raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def score_batch(projector: Projector, center: torch.Tensor, features: torch.Tensor, image_size: int | tuple[int, int],
                sigma: float, reduction: str = "max", topk: int = 10,
                squared: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly maps (N, H, W) at the model input's ``image_size``, image scores (N,)) for a feature batch."""
    return finish_maps(distance_maps(projector, center, features, squared), image_size, sigma, reduction, topk)


def finish_maps(feature_maps: torch.Tensor, image_size: int | tuple[int, int], sigma: float, reduction: str = "max",
                topk: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps at feature resolution (N, h, w) -> (upsampled, smoothed maps (N, H, W), image scores (N,)).

    Every detector (the projector and its peers) goes through this, so they are scored alike.
    """
    maps = gaussian_blur(upsample(feature_maps, image_size), sigma)
    if not torch.isfinite(maps).all():
        raise FloatingPointError("anomaly maps contain NaN or Inf")
    return maps, reduce_maps(maps, reduction, topk)
