"""What :class:`polarocc.Detector` accepts as images, checked and turned into uint8 RGB before any model runs.

A source is a folder, an image path, a list of paths, a PIL image, a numpy array (one H x W or H x W x C image,
or a stack N x H x W x C), or a list mixing these. Arrays must be uint8; float arrays are accepted only with
every value in [0, 1] (scaled by 255 and rounded); anything else is refused with a message that says how to
convert it, so an image is never scored silently on the wrong scale.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from polarocc.data.images import Geometry, open_image, resize_crop, to_rgb
from polarocc.data.inputs import collect_images
from polarocc.errors import DataError


@dataclass(frozen=True)
class SourceImage:
    """One input image: a name for messages and tables, and how to read it."""

    name: str
    path: Path | None = None
    array: np.ndarray | None = None  # uint8 (H, W, 3), already checked

    def rgb(self) -> np.ndarray:
        """The image as uint8 RGB (H, W, 3)."""
        if self.array is not None:
            return self.array
        return np.asarray(to_rgb(open_image(self.path)), dtype=np.uint8)


def _array_image(array: np.ndarray, name: str) -> np.ndarray:
    """A checked uint8 RGB copy of one in-memory image."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise DataError(f"{name}: an image array must be H x W (gray), H x W x 3 (RGB) or H x W x 4 (RGBA), got "
                        f"shape {array.shape}")
    if min(array.shape[:2]) < 1:
        raise DataError(f"{name}: the image array is empty (shape {array.shape})")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise DataError(f"{name}: the float image holds NaN or Inf")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise DataError(f"{name}: float images must hold values in [0, 1], got {low:g}..{high:g}; pass uint8 "
                            "pixels (0-255), or divide by the maximum value first")
        pixels = np.rint(array * 255.0).astype(np.uint8)
    else:
        raise DataError(f"{name}: image arrays must be uint8 (0-255) or float in [0, 1], got {array.dtype}; "
                        "convert it, e.g. (array / array.max() * 255).astype(np.uint8) for 16-bit images")
    return np.asarray(to_rgb(Image.fromarray(np.ascontiguousarray(pixels))), dtype=np.uint8)


def _items(source: Any, name: str) -> Iterator[SourceImage]:
    if isinstance(source, str | Path):
        for path in collect_images([str(source)]):
            yield SourceImage(str(path), path=path)
    elif isinstance(source, Image.Image):
        yield SourceImage(name, array=np.asarray(to_rgb(source), dtype=np.uint8))
    elif isinstance(source, np.ndarray):
        if source.ndim == 4:
            for i, image in enumerate(source):
                yield SourceImage(f"{name}[{i}]", array=_array_image(image, f"{name}[{i}]"))
        else:
            yield SourceImage(name, array=_array_image(source, name))
    elif isinstance(source, Sequence) and not isinstance(source, bytes):
        for i, item in enumerate(source):
            if isinstance(item, list | tuple) or (isinstance(item, np.ndarray) and item.ndim == 4):
                raise DataError(f"{name}[{i}]: nested lists and stacks inside a list are not images; give a flat "
                                "list of paths, PIL images or arrays")
            yield from _items(item, f"{name}[{i}]")
    else:
        raise DataError(f"{name}: cannot read images from a {type(source).__name__}; give a folder, image paths, "
                        "PIL images or numpy arrays")


def as_images(source: Any) -> list[SourceImage]:
    """Every image of ``source``, checked (arrays converted, files found) before anything runs."""
    images = list(_items(source, "images"))
    if not images:
        raise DataError("no input images: give a folder, image paths, PIL images or numpy arrays")
    return images


def batches(images: list[SourceImage], geometry: Geometry, size: int
            ) -> Iterator[tuple[list[SourceImage], np.ndarray, list[np.ndarray]]]:
    """(images, their model inputs (B, height, width, 3) uint8 at ``geometry.size``, the images themselves as uint8
    RGB at their own sizes) ``size`` images at a time: files are decoded only when their batch comes. The inputs
    are those the pipeline makes of image files."""
    for start in range(0, len(images), size):
        chunk = images[start:start + size]
        rgb = [image.rgb() for image in chunk]
        yield chunk, np.stack([resize_crop(x, geometry) for x in rgb]), rgb


def map_to_image(anomaly_map: np.ndarray, geometry: Geometry, size: tuple[int, int]) -> np.ndarray:
    """An anomaly map of the model input (``geometry.size``) at the original image's (height, width).

    The map covers the center crop of the resized image; the border a crop cut off takes the values of the
    nearest mapped pixels (the model never saw it), then the whole resized frame is resized to the image's own
    size (bilinear), undoing the resize. Without a crop only the resize is undone.
    """
    left, top, right, bottom = geometry.box()
    resized_h, resized_w = geometry.resize
    padded = np.pad(anomaly_map.astype(np.float32), ((top, resized_h - bottom), (left, resized_w - right)),
                    mode="edge")
    height, width = size
    return np.asarray(Image.fromarray(padded, mode="F").resize((width, height), Image.Resampling.BILINEAR),
                      dtype=np.float32)
