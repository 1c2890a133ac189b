"""Image and mask loading with the shared resize/center-crop geometry.

Images of any PIL mode (grayscale, RGBA, palette, 16-bit) are converted to 8-bit RGB; masks are
binarised (any non-zero pixel is defective). Images and masks go through the same square resize and
center crop, images with bilinear and masks with nearest interpolation, so they stay aligned.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from polarocc.errors import DataError


@dataclass(frozen=True)
class Geometry:
    """Square resize to ``resize`` pixels, then a center crop of ``crop`` pixels."""

    resize: int = 256
    crop: int = 224

    def box(self) -> tuple[int, int, int, int]:
        """The crop box (left, top, right, bottom) in the resized image."""
        offset = (self.resize - self.crop) // 2
        return offset, offset, offset + self.crop, offset + self.crop


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file, naming the file when it cannot be read."""
    try:
        img = Image.open(path)
        img.load()
    except FileNotFoundError as exc:
        raise DataError(f"image file {path} does not exist") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise DataError(f"cannot read image {path} ({exc}); replace or remove the file") from exc
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, rescaling 16/32-bit grayscale to 0..255."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: Path, geometry: Geometry) -> np.ndarray:
    """Read an image as uint8 RGB of shape (crop, crop, 3)."""
    img = to_rgb(open_image(path)).resize((geometry.resize, geometry.resize), Image.Resampling.BILINEAR)
    return np.asarray(img.crop(geometry.box()), dtype=np.uint8)


def resize_crop(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An in-memory uint8 image resized and cropped like :func:`load_image` does a file."""
    img = Image.fromarray(image).resize((geometry.resize, geometry.resize), Image.Resampling.BILINEAR)
    return np.asarray(img.crop(geometry.box()))


def load_mask(path: Path, geometry: Geometry) -> np.ndarray:
    """Read a mask as a bool array (crop, crop); any non-zero pixel is defective."""
    mask = open_image(path)
    binary = Image.fromarray((np.asarray(mask.convert("L")) > 0).astype(np.uint8) * 255)
    binary = binary.resize((geometry.resize, geometry.resize), Image.Resampling.NEAREST)
    return np.asarray(binary.crop(geometry.box())) > 0

