"""Image and mask loading with the shared resize/center-crop geometry.

Images of any PIL mode (grayscale, RGBA, palette, 16-bit) are converted to 8-bit RGB; masks are
binarised (any non-zero pixel is defective). Images and masks go through the same resize and center crop
(:class:`~polarocc.geometry.Geometry`), images with bilinear and masks with nearest interpolation, so they
stay aligned.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from polarocc.errors import DataError
from polarocc.geometry import Geometry

__all__ = ["Geometry", "image_size", "load_image", "load_mask", "open_image", "resize_crop", "to_rgb"]


def _pixels(count: float) -> str:
    return f"{count / 1e6:,.0f} megapixels" if count >= 1e6 else f"{count:,.0f} pixels"


def _too_large(path: Path, exc: Exception, limit: float) -> DataError:
    """The error for an image over Pillow's decompression-bomb limit of ``limit`` pixels."""
    found = re.search(r"\((\d+) pixels\)", str(exc))  # Pillow's message is the only place the size is known
    size = f" ({_pixels(int(found.group(1)))})" if found else ""
    return DataError(f"image {path} is too large to decode{size}: Pillow refuses images over {_pixels(limit)} "
                     "as possible decompression bombs; downscale it below that limit (polarocc resizes "
                     "every image to a few hundred pixels anyway) or remove the file")


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn whatever Pillow raises for a missing, broken or oversized file into a DataError naming it."""
    try:
        yield
    except FileNotFoundError as exc:
        raise DataError(f"image file {path} does not exist") from exc
    except Image.DecompressionBombError as exc:  # not an OSError: it would escape as a traceback
        raise _too_large(path, exc, 2 * (Image.MAX_IMAGE_PIXELS or 0)) from exc
    except Image.DecompressionBombWarning as exc:
        # Raised only where warnings are turned into errors (python -W error): report it like the hard limit
        # instead of a traceback. Under the default filters Pillow merely warns and the image loads.
        raise _too_large(path, exc, Image.MAX_IMAGE_PIXELS or 0) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # ValueError: Pillow's refusal of oversized compressed chunks ("Decompressed Data Too Large")
        raise DataError(f"cannot read image {path} ({exc}); replace or remove the file") from exc


def open_image(path: Path) -> Image.Image:
    """Open and fully decode an image file, naming the file when it cannot be read."""
    with _reading(path):
        img = Image.open(path)
        img.load()
    return img


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from an image file's header, without decoding it; errors as :func:`open_image`."""
    with _reading(path), Image.open(path) as img:
        return img.size


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


def _resized(img: Image.Image, geometry: Geometry, resample: Image.Resampling) -> Image.Image:
    height, width = geometry.resize
    img = img.resize((width, height), resample)
    return img if geometry.crop is None else img.crop(geometry.box())


def load_image(path: Path, geometry: Geometry) -> np.ndarray:
    """Read an image as the model input: uint8 RGB of shape (height, width, 3) of ``geometry.size``."""
    return np.asarray(_resized(to_rgb(open_image(path)), geometry, Image.Resampling.BILINEAR), dtype=np.uint8)


def resize_crop(image: np.ndarray, geometry: Geometry) -> np.ndarray:
    """An in-memory uint8 image resized and cropped like :func:`load_image` does a file."""
    return np.asarray(_resized(Image.fromarray(image), geometry, Image.Resampling.BILINEAR))


def load_mask(path: Path, geometry: Geometry) -> np.ndarray:
    """Read a mask as a bool array of ``geometry.size``; any non-zero pixel is defective."""
    mask = open_image(path)
    binary = Image.fromarray((np.asarray(mask.convert("L")) > 0).astype(np.uint8) * 255)
    return np.asarray(_resized(binary, geometry, Image.Resampling.NEAREST)) > 0
