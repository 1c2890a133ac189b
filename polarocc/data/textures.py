"""The embedded ``textures`` dataset: real texture photos with synthetic defects and exact masks.

scikit-image ships real photographs of textures (brick, grass, gravel, ...). Normal samples are random
crops (with flips and right-angle rotations) of each photo; training crops come from the top part of
the photo and test crops from the bottom part, so no test pixel was seen in training. Defective test
samples get one synthetic defect whose pixel mask is known exactly. The result is written in MVTec AD
layout and read back through the same reader as real data.

The ``small_defects`` variant cuts landscape regions (``crop`` x 2.5 ``crop``, flipped or turned by 180 degrees
only), resizes them so the longer side is ``image_size`` and paints defects named by what they test: ``tiny``
(a few pixels), ``small`` (0.05-0.2% of the area), ``border`` (0.3-1%, touching the left/right or top/bottom
edge, mostly inside the outer 6.25% that a square resize and 7/8 center crop cut off) and ``medium`` (0.5-1%,
the control). Its interior defects stay at least 15% of each dimension away from every edge.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skdata
from tqdm import tqdm

from polarocc.config import DEFECT_TYPES, VARIANT_DEFECT_TYPES
from polarocc.errors import ConfigError

TEXTURE_SOURCES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
}
TRAIN_FRACTION = 0.6  # share of the photo's rows reserved for training crops
ASPECT = 2.5  # columns per row of the small_defects variant's regions and images


@dataclass(frozen=True)
class TextureSpec:
    """How many samples of each kind to make per category, and their geometry."""

    train: int = 64
    test_good: int = 16
    defects_per_type: int = 6
    defect_types: tuple[str, ...] = DEFECT_TYPES
    crop: int = 200
    image_size: int = 256
    variant: str = "textures"  # or small_defects; see the module docstring

    def __post_init__(self) -> None:
        # The standard default list stands for "the variant's own types", as in params (EmbeddedDataConfig).
        if self.variant in VARIANT_DEFECT_TYPES and self.defect_types == DEFECT_TYPES:
            object.__setattr__(self, "defect_types", VARIANT_DEFECT_TYPES[self.variant])


def region_shape(crop: int, variant: str = "textures") -> tuple[int, int]:
    """Rows and columns of the photo region each sample is cut from."""
    return (crop, crop) if variant == "textures" else (crop, round(ASPECT * crop))


def image_shape(image_size: int, variant: str = "textures") -> tuple[int, int]:
    """Rows and columns of the written images (the longer side is ``image_size``)."""
    return (image_size, image_size) if variant == "textures" else (max(1, round(image_size / ASPECT)), image_size)


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


# The small_defects variant. Sizes are given in pixels of a 768-wide image and scale with the image's width.
REFERENCE_WIDTH = 768
INTERIOR = 0.15  # interior defects keep this share of each dimension away from every edge
BORDER = 0.0625  # the outer share of each dimension that a square resize and a 7/8 center crop cut off
SMALL_MIN_PIXELS = 12.0  # floors that keep tiny < small < medium on small images
MEDIUM_MIN_PIXELS = 40.0
Cropper = Callable[[np.ndarray, tuple[int, int], int, int, np.random.Generator], np.ndarray]
Defect = Callable[[np.ndarray, np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _random_wide_crop(photo: np.ndarray, rows: tuple[int, int], crop: int, size: int,
                      rng: np.random.Generator) -> np.ndarray:
    height, width = region_shape(crop, "small_defects")
    top = int(rng.integers(rows[0], rows[1] - height + 1))
    left = int(rng.integers(0, photo.shape[1] - width + 1))
    patch = photo[top:top + height, left:left + width].astype(np.float64) / 255.0
    # Only the turns that keep the region landscape: 180 degrees and a mirror image.
    if rng.random() < 0.5:
        patch = patch[::-1, ::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    from skimage.transform import resize

    return resize(patch, image_shape(size, "small_defects"), order=1, anti_aliasing=True)


def _region(shape: tuple[int, int], center: tuple[float, float], reach: float,
            inside: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """The pixels for which ``inside(row offset, column offset)`` holds, looked for within ``reach`` of
    ``center``; the pixel under the center always belongs, so no region is empty however small the image."""
    rows = np.arange(max(0, int(np.floor(center[0] - reach))), min(shape[0], int(np.ceil(center[0] + reach)) + 1))
    cols = np.arange(max(0, int(np.floor(center[1] - reach))), min(shape[1], int(np.ceil(center[1] + reach)) + 1))
    mask = np.zeros(shape, dtype=bool)
    if rows.size and cols.size:
        mask[np.ix_(rows, cols)] = inside(rows[:, None] - center[0], cols[None, :] - center[1])
    mask[min(max(round(center[0]), 0), shape[0] - 1), min(max(round(center[1]), 0), shape[1] - 1)] = True
    return mask


def _ellipse_region(shape: tuple[int, int], center: tuple[float, float], radii: tuple[float, float],
                    angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)

    def inside(dr: np.ndarray, dc: np.ndarray) -> np.ndarray:
        return ((dr * cos + dc * sin) / radii[0]) ** 2 + ((dc * cos - dr * sin) / radii[1]) ** 2 <= 1.0

    return _region(shape, center, max(radii), inside)


def _line_region(shape: tuple[int, int], center: tuple[float, float], length: float, width: float,
                 angle: float) -> np.ndarray:
    """A scratch: the pixels within ``width / 2`` of a segment of ``length`` through ``center``."""
    along_r, along_c = np.sin(angle), np.cos(angle)

    def inside(dr: np.ndarray, dc: np.ndarray) -> np.ndarray:
        t = np.clip(dr * along_r + dc * along_c, -length / 2, length / 2)
        return (dr - t * along_r) ** 2 + (dc - t * along_c) ** 2 <= (width / 2) ** 2

    return _region(shape, center, length / 2 + width / 2, inside)


def _interior(shape: tuple[int, int]) -> np.ndarray:
    """The pixels at least ``INTERIOR`` of each dimension away from every edge."""
    keep = np.zeros(shape, dtype=bool)
    rows, cols = np.arange(shape[0]), np.arange(shape[1])
    keep[np.ix_((rows >= INTERIOR * shape[0]) & (rows <= shape[0] - 1 - INTERIOR * shape[0]),
                (cols >= INTERIOR * shape[1]) & (cols <= shape[1] - 1 - INTERIOR * shape[1]))] = True
    return keep


def _interior_center(shape: tuple[int, int], reach: tuple[float, float],
                     rng: np.random.Generator) -> tuple[float, float]:
    """A center whose region, ``reach`` rows and columns around it, lies in the interior (the middle if none)."""
    center = []
    for n, r in zip(shape, reach, strict=True):
        low, high = INTERIOR * n + r, n - 1 - INTERIOR * n - r
        center.append(float(rng.uniform(low, high)) if low < high else (n - 1) / 2)
    return center[0], center[1]


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def _paint(look: str, img: np.ndarray, region: np.ndarray, rng: np.random.Generator,
           other: np.ndarray) -> np.ndarray:
    """``img`` with ``region`` painted in one of the standard looks (hole, stain, patch) or as a flat ``mark``
    of strong contrast (scratches, tiny spots); every region pixel differs from ``img`` once written as 8 bits,
    so the region is exactly the changed pixels."""
    out = img.copy()
    if look == "hole":
        out[region] = rng.uniform(0.0, 0.06, size=int(region.sum()))
    elif look == "stain":
        tone = 0.85 if rng.random() < 0.5 else 0.15
        out[region] = 0.2 * img[region] + 0.8 * tone
    elif look == "patch":
        out[region] = other[region]
    else:
        out[region] = 0.03 if img[region].mean() > 0.5 else 0.97
    # Where a painted value happens to round to the old one, nudge it by 3 grey levels away from it.
    same = region & (_to_uint8(out) == _to_uint8(img))
    out[same] = np.where(img[same] < 0.5, img[same] + 3 / 255, img[same] - 3 / 255)
    return out


def _tiny(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scale = img.shape[1] / REFERENCE_WIDTH
    angle = rng.uniform(0, np.pi)
    if rng.random() < 0.5:  # a spot 3-6 px across
        radii = np.maximum(0.5, rng.uniform(1.5, 3.0, size=2) * scale)
        center = _interior_center(img.shape, (radii.max(), radii.max()), rng)
        region = _ellipse_region(img.shape, center, (radii[0], radii[1]), angle)
    else:  # a scratch 1-2 px wide and 8-16 px long
        length, width = max(2.0, rng.uniform(8, 16) * scale), max(1.0, rng.uniform(1, 2) * scale)
        reach = length / 2 + width / 2
        center = _interior_center(img.shape, (reach, reach), rng)
        region = _line_region(img.shape, center, length, width, angle)
    region &= _interior(img.shape)
    return _paint("mark", img, region, rng, other), region


def _interior_defect(img: np.ndarray, rng: np.random.Generator, other: np.ndarray, area: float,
                     looks: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A defect of about ``area`` pixels in the interior, in one of ``looks`` (``mark``: a scratch)."""
    look = looks[int(rng.integers(len(looks)))]
    shape = img.shape
    if look == "mark":
        width = max(1.0, rng.uniform(1.5, 3.0) * shape[1] / REFERENCE_WIDTH)
        angle = rng.uniform(-0.6, 0.6)  # roughly along the long side, so a long scratch fits the interior
        sin, cos = abs(np.sin(angle)), abs(np.cos(angle))
        room = [((1 - 2 * INTERIOR) * n - 1) / 2 - width / 2 for n in shape]
        length = max(1.0, min(area / width, 2 * room[1] / cos, 2 * room[0] / max(sin, 1e-6)))
        width = max(width, area / length)
        center = _interior_center(shape, (sin * length / 2 + width / 2, cos * length / 2 + width / 2), rng)
        region = _line_region(shape, center, length, width, angle)
    else:
        elongation = rng.uniform(0.5, 1.0)
        radius = np.sqrt(area / (np.pi * elongation))
        center = _interior_center(shape, (radius, radius), rng)
        region = _ellipse_region(shape, center, (radius, radius * elongation), rng.uniform(0, np.pi))
    region &= _interior(shape)
    return _paint(look, img, region, rng, other), region


def _small(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    area = max(rng.uniform(0.0005, 0.002) * img.size, SMALL_MIN_PIXELS)
    return _interior_defect(img, rng, other, area, ("hole", "stain", "patch", "mark"))


def _medium(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    area = max(rng.uniform(0.005, 0.01) * img.size, MEDIUM_MIN_PIXELS)
    return _interior_defect(img, rng, other, area, ("hole", "stain", "patch"))


def _border(img: np.ndarray, rng: np.random.Generator, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A half ellipse on an edge (left/right three times in four), its width at most the outer 6.25%."""
    area = rng.uniform(0.003, 0.01) * img.size
    sideways = rng.random() < 0.75
    across_n, along_n = (img.shape[1], img.shape[0]) if sideways else img.shape
    across = max(1.0, rng.uniform(0.6, 1.0) * BORDER * across_n)
    inset = rng.uniform(-0.3, 0.3)  # the center's distance inside the edge, in radii (negative: outside)
    visible = (np.pi / 2 + np.arcsin(inset) + inset * np.sqrt(1 - inset ** 2)) / np.pi  # share inside the image
    along = min(area / (np.pi * across * visible), 0.45 * along_n)
    low, high = along, along_n - 1 - along
    at = float(rng.uniform(low, high)) if low < high else (along_n - 1) / 2
    edge = 0 if rng.random() < 0.5 else across_n - 1
    offset = inset * across if edge == 0 else edge - inset * across
    center, radii, touch = (((at, offset), (along, across), (round(at), edge)) if sideways
                            else ((offset, at), (across, along), (edge, round(at))))
    region = _ellipse_region(img.shape, center, radii, 0.0)
    region[touch] = True  # inside the ellipse already for any size but tiny ones; it must touch the edge
    look = ("hole", "stain", "patch")[int(rng.integers(3))]
    return _paint(look, img, region, rng, other), region


SMALL_DEFECTS: dict[str, Defect] = {"tiny": _tiny, "small": _small, "border": _border, "medium": _medium}
VARIANTS: dict[str, tuple[Cropper, dict[str, Defect]]] = {
    "textures": (_random_crop, DEFECTS),
    "small_defects": (_random_wide_crop, SMALL_DEFECTS),
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
    if spec.variant not in VARIANTS:
        raise ValueError(f"unknown variant {spec.variant!r}; choose from {', '.join(VARIANTS)}")
    cut, defects = VARIANTS[spec.variant]
    unknown = sorted(set(spec.defect_types) - set(defects))
    if unknown:
        raise ValueError(f"unknown defect type(s) {unknown} of variant {spec.variant}; "
                         f"choose from {', '.join(defects)}")
    # One stream per category keeps each category reproducible on its own.
    rng = np.random.default_rng([seed, sorted(TEXTURE_SOURCES).index(category)])
    photo = TEXTURE_SOURCES[category]()
    split_row = int(photo.shape[0] * TRAIN_FRACTION)
    train_rows, test_rows = (0, split_row), (split_row, photo.shape[0])
    others = [name for name in TEXTURE_SOURCES if name != category]
    base = root / category
    for i in range(spec.train):
        crop = cut(photo, train_rows, spec.crop, spec.image_size, rng)
        _save_rgb(crop, base / "train/good" / f"{i:03d}.png")
    for i in range(spec.test_good):
        crop = cut(photo, test_rows, spec.crop, spec.image_size, rng)
        _save_rgb(crop, base / "test/good" / f"{i:03d}.png")
    for kind in spec.defect_types:
        for i in range(spec.defects_per_type):
            img = cut(photo, test_rows, spec.crop, spec.image_size, rng)
            other_photo = TEXTURE_SOURCES[others[int(rng.integers(len(others)))]]()
            # The foreign texture is also seen at twice the scale, so its structure differs in size too.
            other = cut(other_photo, (0, other_photo.shape[0]), spec.crop // 2, spec.image_size, rng)
            defective, mask = defects[kind](img, rng, other)
            _save_rgb(defective, base / "test" / kind / f"{i:03d}.png")
            _save_mask(mask, base / "ground_truth" / kind / f"{i:03d}_mask.png")
    return {"train": spec.train, "test_good": spec.test_good,
            "test_defective": spec.defects_per_type * len(spec.defect_types)}


def check_spec(categories: tuple[str, ...], crop: int, variant: str = "textures") -> None:
    """ConfigError naming ``embedded_data.crop`` when a crop (for ``small_defects``: a crop x 2.5 crop region)
    does not fit the part of a photo it is cut from (test crops come from the bottom ``1 - TRAIN_FRACTION``)."""
    for category in categories:
        rows, columns = TEXTURE_SOURCES[category]().shape[:2]
        largest = min(rows - int(rows * TRAIN_FRACTION), int(rows * TRAIN_FRACTION), columns)
        if variant == "textures":
            if crop > largest:
                raise ConfigError(f"params key 'embedded_data.crop': {crop} px crops do not fit the {category} "
                                  f"photo ({rows}x{columns}, {largest} rows for test crops); use at most {largest}")
            continue
        widest = int(columns / ASPECT) + 1
        while region_shape(widest, variant)[1] > columns:
            widest -= 1
        if crop > min(largest, widest):
            height, width = region_shape(crop, variant)
            raise ConfigError(f"params key 'embedded_data.crop': the {variant} variant's {height}x{width} px regions "
                              f"(crop x {ASPECT:g} crop) do not fit the {category} photo ({rows}x{columns}, "
                              f"{largest} rows for test regions); use at most {min(largest, widest)}")


def make_textures(root: Path, categories: tuple[str, ...], spec: TextureSpec, seed: int) -> dict[str, dict[str, int]]:
    """Write the whole embedded dataset; deterministic from ``seed``."""
    check_spec(categories, spec.crop, spec.variant)
    counts = {}
    for category in tqdm(categories, desc="textures", unit="category"):
        counts[category] = make_category(root, category, spec, seed)
    return counts
