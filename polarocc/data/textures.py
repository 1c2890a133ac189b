"""The embedded ``textures`` dataset: real texture photos with synthetic defects and exact masks.

scikit-image ships real photographs of textures (brick, grass, gravel, ...). Normal samples are random
crops (with flips and right-angle rotations) of each photo; training crops come from the top part of
the photo and test crops from the bottom part, so no test pixel was seen in training. Defective test
samples get one synthetic defect whose pixel mask is known exactly. The result is written in MVTec AD
layout and read back through the same reader as real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from tqdm import tqdm

from polarocc.config import DEFECT_TYPES
from polarocc.errors import ConfigError

TEXTURE_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
}
TRAIN_FRACTION = 0.6  # share of the photo's rows reserved for training crops


@dataclass(frozen=True)
class TextureSpec:
    """How many samples of each kind to make per category, and their geometry."""

    train: int = 64
    test_good: int = 16
    defects_per_type: int = 6
    defect_types: tuple[str, ...] = DEFECT_TYPES
    crop: int = 200
    image_size: int = 256


def _random_crop(photo: np.ndarray, rows: tuple[int, int], crop: int, size: int,
                 rng: np.random.Generator) -> np.ndarray:
    top = int(rng.integers(rows[0], rows[1] - crop + 1))
    left = int(rng.integers(0, photo.shape[1] - crop + 1))
    patch = photo[top:top + crop, left:left + crop].astype(np.float64) / 255.0
    patch = np.rot90(patch, k=int(rng.integers(4)))
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    from skimage.transform import resize  # here, like draw below: scipy's import would cost `validate` (check_spec)

    return resize(patch, (size, size), order=1, anti_aliasing=True)


def _defect_center(size: int, rng: np.random.Generator) -> tuple[int, int]:
    # Keep defects inside the central region so a center crop of 7/8 never cuts them off.
    margin = size // 4
    return int(rng.integers(margin, size - margin)), int(rng.integers(margin, size - margin))


def _scratch(img: np.ndarray, rng: np.random.Generator, _other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    r0, c0 = _defect_center(size, rng)
    angle = rng.uniform(0, np.pi)
    length = rng.uniform(0.25, 0.45) * size
    dr, dc = np.sin(angle) * length / 2, np.cos(angle) * length / 2
    mask = np.zeros_like(img, dtype=bool)
    width = int(rng.integers(2, 5))
    from skimage import draw

    for offset in range(-(width // 2), width - width // 2):
        rr, cc = draw.line(int(r0 - dr) + offset, int(c0 - dc), int(r0 + dr) + offset, int(c0 + dc))
        keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
        mask[rr[keep], cc[keep]] = True
    out = img.copy()
    out[mask] = 1.0 if rng.random() < 0.5 else 0.05
    return out, mask


def _ellipse_mask(size: int, rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    r0, c0 = _defect_center(size, rng)
    radii = rng.uniform(lo, hi, size=2) * size
    from skimage import draw

    rr, cc = draw.ellipse(r0, c0, radii[0], radii[1], shape=(size, size), rotation=rng.uniform(0, np.pi))
    mask = np.zeros((size, size), dtype=bool)
    mask[rr, cc] = True
    return mask


def _hole(img: np.ndarray, rng: np.random.Generator, _other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse_mask(img.shape[0], rng, 0.04, 0.09)
    out = img.copy()
    out[mask] = rng.uniform(0.0, 0.06, size=int(mask.sum()))
    return out, mask


def _stain(img: np.ndarray, rng: np.random.Generator, _other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse_mask(img.shape[0], rng, 0.06, 0.12)
    out = img.copy()
    tone = 0.85 if rng.random() < 0.5 else 0.15
    # A semi-transparent, flat stain: the texture shows through but loses most of its contrast.
    out[mask] = 0.2 * img[mask] + 0.8 * tone
    return out, mask


def _patch(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mask = _ellipse_mask(img.shape[0], rng, 0.07, 0.13)
    out = img.copy()
    out[mask] = other[mask]
    return out, mask


DEFECTS: dict[str, Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "hole": _hole,
    "stain": _stain,
    "patch": _patch,
}


def _save_rgb(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(path)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def make_category(root: Path, category: str, spec: TextureSpec, seed: int) -> dict[str, int]:
    """Write one category in MVTec AD layout under ``root/category``; returns sample counts."""
    if category not in TEXTURE_SOURCES:
        raise ValueError(f"unknown texture {category!r}; choose from {', '.join(TEXTURE_SOURCES)}")
    unknown = sorted(set(spec.defect_types) - set(DEFECTS))
    if unknown:
        raise ValueError(f"unknown defect type(s) {unknown}; choose from {', '.join(DEFECTS)}")
    # One stream per category keeps each category reproducible on its own.
    rng = np.random.default_rng([seed, sorted(TEXTURE_SOURCES).index(category)])
    photo = TEXTURE_SOURCES[category]()
    split_row = int(photo.shape[0] * TRAIN_FRACTION)
    train_rows, test_rows = (0, split_row), (split_row, photo.shape[0])
    others = [name for name in TEXTURE_SOURCES if name != category]
    base = root / category
    for i in range(spec.train):
        crop = _random_crop(photo, train_rows, spec.crop, spec.image_size, rng)
        _save_rgb(crop, base / "train/good" / f"{i:03d}.png")
    for i in range(spec.test_good):
        crop = _random_crop(photo, test_rows, spec.crop, spec.image_size, rng)
        _save_rgb(crop, base / "test/good" / f"{i:03d}.png")
    for kind in spec.defect_types:
        for i in range(spec.defects_per_type):
            img = _random_crop(photo, test_rows, spec.crop, spec.image_size, rng)
            other_photo = TEXTURE_SOURCES[others[int(rng.integers(len(others)))]]()
            # The foreign texture is also seen at twice the scale, so its structure differs in size too.
            other = _random_crop(other_photo, (0, other_photo.shape[0]), spec.crop // 2, spec.image_size, rng)
            defective, mask = DEFECTS[kind](img, rng, other)
            _save_rgb(defective, base / "test" / kind / f"{i:03d}.png")
            _save_mask(mask, base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return {"train": spec.train, "test_good": spec.test_good,
            "test_defective": spec.defects_per_type * len(spec.defect_types)}


def check_spec(categories: tuple[str, ...], crop: int) -> None:
    """ConfigError naming ``embedded_data.crop`` when a crop does not fit the part of a photo it is cut from
    (test crops come from the bottom ``1 - TRAIN_FRACTION`` of each photo)."""
    for category in categories:
        rows, columns = TEXTURE_SOURCES[category]().shape[:2]
        largest = min(rows - int(rows * TRAIN_FRACTION), int(rows * TRAIN_FRACTION), columns)
        if crop > largest:
            raise ConfigError(f"params key 'embedded_data.crop': {crop} px crops do not fit the {category} photo "
                              f"({rows}x{columns}, {largest} rows for test crops); use at most {largest}")


def make_textures(root: Path, categories: tuple[str, ...], spec: TextureSpec, seed: int) -> dict[str, dict[str, int]]:
    """Write the whole embedded dataset; deterministic from ``seed``."""
    check_spec(categories, spec.crop)
    counts = {}
    for category in tqdm(categories, desc="textures", unit="category"):
        counts[category] = make_category(root, category, spec, seed)
    return counts
