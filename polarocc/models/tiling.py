"""Features of a large model input from overlapping tiles, stitched into one map per image.

The backbone sees each tile on its own (as many images at once as a batch holds), so its memory and receptive
field stay those of a tile while the feature map keeps the input's full resolution. A CNN's features near a tile
edge are computed from zero padding instead of the neighbouring pixels; a plain average of the overlaps keeps
those edge features at full weight and leaves a step at every tile border. Each tile's features are therefore
weighted by a ramp that falls towards its edges that lie inside the image (squared, over half a tile), and every
position takes the weighted average of the tiles that cover it: the map crosses tile borders smoothly (see
tests/test_tiling.py), and image borders keep the weights a single forward would give them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from polarocc.errors import ConfigError
from polarocc.geometry import Geometry, Tiles
from polarocc.models.backbone import FeatureExtractor, FeatureSpec, as_size


def edge_ramp(length: int, start_inside: bool, end_inside: bool) -> torch.Tensor:
    """Per-position weights (length,) of one tile along one axis: 1 in the middle, falling quadratically over half
    the tile towards each end that lies inside the image (never to 0, so every position stays covered)."""
    distance = torch.arange(length, dtype=torch.float32) + 0.5
    weight = torch.ones(length)
    half = length / 2
    if start_inside:
        weight = torch.minimum(weight, distance / half)
    if end_inside:
        weight = torch.minimum(weight, distance.flip(0) / half)
    return weight.square()


class TiledExtractor(nn.Module):
    """A :class:`FeatureExtractor` run on square tiles of its input, with the tiles' features stitched."""

    def __init__(self, extractor: FeatureExtractor, tiles: Tiles) -> None:
        super().__init__()
        self.inner = extractor
        self.tiles = tiles
        self.description = extractor.description

    @property
    def mean(self) -> torch.Tensor:
        return self.inner.mean

    @property
    def std(self) -> torch.Tensor:
        return self.inner.std

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner.normalize(images)

    def stride(self) -> int:
        """Input pixels per feature position, from one tile's feature map; ConfigError when the tile size is not
        a multiple of it (tile features must land on whole positions of the stitched map)."""
        size = self.tiles.size
        spec = self.inner.spec(size)
        stride = size // spec.height
        if stride * spec.height != size or stride * spec.width != size:
            raise ConfigError(f"params key 'backbone.tiles.size': {size} px tiles give {spec.height}x{spec.width} "
                              "feature positions, not a whole number of pixels each; use a multiple of 32 "
                              "(e.g. 224)")
        return stride

    def spec(self, size: int | tuple[int, int]) -> FeatureSpec:
        """Stitched output shape for a (height, width) input: ceil(side / stride) positions per axis."""
        height, width = as_size(size)
        self._check_fits(height, width)
        stride = self.stride()
        inner = self.inner.spec(self.tiles.size)
        return FeatureSpec(inner.channels, math.ceil(height / stride), math.ceil(width / stride), inner.mean,
                           inner.std)

    def _check_fits(self, height: int, width: int) -> None:
        if self.tiles.size > min(height, width):
            raise ConfigError(f"params key 'backbone.tiles.size': {self.tiles.size} px tiles do not fit the model "
                              f"input {height}x{width}; use tiles of at most {min(height, width)} px")

    def layout(self, height: int, width: int) -> tuple[list[int], list[int], int]:
        """(tile rows' starts, tile columns' starts, feature stride) for a (height, width) input."""
        self._check_fits(height, width)
        stride = self.stride()
        return self.tiles.offsets(height, stride), self.tiles.offsets(width, stride), stride

    def count(self, size: int | tuple[int, int]) -> int:
        """How many tiles cover an input of ``size``."""
        rows, columns, _ = self.layout(*as_size(size))
        return len(rows) * len(columns)

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Stitched features (B, C, ceil(H / stride), ceil(W / stride)) of uint8 images (B, H, W, 3)."""
        return self.compute(images, dtype)

    def compute(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """:meth:`forward` outside inference mode (for the ONNX tracer)."""
        height, width = int(images.shape[1]), int(images.shape[2])
        rows, columns, stride = self.layout(height, width)
        size = self.tiles.size
        full_h, full_w = rows[-1] + size, columns[-1] + size
        if (full_h, full_w) != (height, width):  # the last tile reaches up to stride - 1 px past the edge
            ys = torch.arange(full_h, device=images.device).clamp_(max=height - 1)
            xs = torch.arange(full_w, device=images.device).clamp_(max=width - 1)
            images = images[:, ys][:, :, xs]
        tile = size // stride
        out_h, out_w = full_h // stride, full_w // stride
        tracing = torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()
        total = weights_sum = None
        for a, top in enumerate(rows):
            along_y = edge_ramp(tile, a > 0, a < len(rows) - 1)
            for b, left in enumerate(columns):
                weight = (along_y[:, None] * edge_ramp(tile, b > 0, b < len(columns) - 1)[None]).to(images.device)
                features = self.inner.compute(images[:, top:top + size, left:left + size].contiguous()).float()
                y, x = top // stride, left // stride
                if not tracing:  # added into its slice: the same sums, without a full-size map per tile
                    if total is None:
                        total = features.new_zeros((features.shape[0], features.shape[1], out_h, out_w))
                        weights_sum = weight.new_zeros((out_h, out_w))
                    total[..., y:y + tile, x:x + tile] += features * weight
                    weights_sum[y:y + tile, x:x + tile] += weight
                    continue
                # For the ONNX tracer: each weighted tile padded to the full map (no in-place writes to trace).
                pad = (left // stride, out_w - left // stride - tile, top // stride, out_h - top // stride - tile)
                placed = F.pad(features * weight, pad)
                spread = F.pad(weight, pad)
                total = placed if total is None else total + placed
                weights_sum = spread if weights_sum is None else weights_sum + spread
        assert total is not None and weights_sum is not None
        result = total / weights_sum
        return result if dtype is None else result.to(dtype)


def for_geometry(extractor: FeatureExtractor, geometry: Geometry) -> FeatureExtractor | TiledExtractor:
    """The extractor that turns ``geometry``'s model inputs into features: tiled when the geometry has tiles."""
    if geometry.tiles is None:
        return extractor
    return TiledExtractor(extractor, geometry.tiles)
