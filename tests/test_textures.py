"""The embedded textures dataset: layout, exact masks, determinism; the small_defects variant."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from polarocc.config import DEFECT_TYPES, SMALL_DEFECT_TYPES, load_params, parse_params
from polarocc.data.textures import (
    SMALL_DEFECTS,
    TEXTURE_SOURCES,
    TextureSpec,
    _random_crop,
    _random_wide_crop,
    check_spec,
    image_shape,
    make_category,
    make_textures,
)
from polarocc.errors import ConfigError
from polarocc.pipeline.prepare import run_prepare
from tests.conftest import TINY_SPEC, tiny_params, write_params


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_masks(mvtec_tree: Path) -> None:
    for category in ("brick", "gravel"):
        base = mvtec_tree / category
        assert len(list((base / "train/good").glob("*.png"))) == TINY_SPEC.train
        assert len(list((base / "test/good").glob("*.png"))) == TINY_SPEC.test_good
        for kind in ("scratch", "hole", "stain", "patch"):
            image = np.asarray(Image.open(base / "test" / kind / "000.png"))
            mask = np.asarray(Image.open(base / "ground_truth" / kind / "000_mask.png"))
            assert image.shape == (64, 64, 3) and mask.shape == (64, 64)
            assert set(np.unique(mask)) == {0, 255}
            # the defect lies in the central region, so the 7/8 center crop keeps it
            rows, cols = np.nonzero(mask)
            assert rows.mean() > 8 and rows.mean() < 56 and cols.mean() > 8 and cols.mean() < 56


def test_deterministic(tmp_path: Path, mvtec_tree: Path) -> None:
    make_textures(tmp_path / "a", ("brick", "gravel"), TINY_SPEC, seed=7)
    assert _digest(tmp_path / "a") == _digest(mvtec_tree)
    make_textures(tmp_path / "b", ("brick", "gravel"), TINY_SPEC, seed=8)
    assert _digest(tmp_path / "b") != _digest(mvtec_tree)


def test_crops_stay_in_their_rows() -> None:
    # Pixel value = row index of the photo: a crop drawn from rows [a, b) holds only values in [a, b).
    photo = np.repeat(np.arange(512, dtype=np.float64)[:, None], 512, axis=1) / 2  # values 0..255.5
    rng = np.random.default_rng(0)
    for rows in ((0, 307), (307, 512)):
        for _ in range(20):
            crop = _random_crop(photo, rows, 200, 64, rng) * 255.0 * 2
            assert crop.min() >= rows[0] - 1e-6 and crop.max() <= rows[1] - 1 + 1e-6


# The default variant's output before the small_defects variant existed: paths and decoded pixels of every file
# (decoded, because PNG bytes also depend on the zlib build, which is not the generator's doing).
DEFAULT_SPEC = TextureSpec(train=2, test_good=1, defects_per_type=1, crop=64, image_size=48)
DEFAULT_DIGEST = "8c1948c458c55b43fc17c82faf493c46b595d8e8af62d9c70d8bf6477c81904f"
SMALL_SPEC = TextureSpec(train=2, test_good=1, defects_per_type=1, crop=64, image_size=160, variant="small_defects")
CATEGORIES = ("brick", "grass", "gravel")


def _pixel_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        pixels = np.asarray(Image.open(path))
        h.update(path.relative_to(root).as_posix().encode())
        h.update(str(pixels.shape).encode())
        h.update(pixels.tobytes())
    return h.hexdigest()


def test_default_variant_output_is_unchanged(tmp_path: Path) -> None:
    make_textures(tmp_path, CATEGORIES, DEFAULT_SPEC, seed=3)
    assert _pixel_digest(tmp_path) == DEFAULT_DIGEST


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small_defects")
    make_textures(root, CATEGORIES, SMALL_SPEC, seed=11)
    return root


def _mask(root: Path, category: str, kind: str) -> np.ndarray:
    return np.asarray(Image.open(root / category / "ground_truth" / kind / "000_mask.png")) > 0


def _interior_ok(mask: np.ndarray) -> bool:
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return bool(rows.min() >= 0.15 * h and rows.max() <= h - 1 - 0.15 * h
                and cols.min() >= 0.15 * w and cols.max() <= w - 1 - 0.15 * w)


def test_small_defects_layout_and_shapes(small_tree: Path) -> None:
    shape = (round(160 / 2.5), 160)
    assert image_shape(160, "small_defects") == shape
    assert SMALL_SPEC.defect_types == SMALL_DEFECT_TYPES  # the standard default stands for the variant's own
    for category in CATEGORIES:
        base = small_tree / category
        images = sorted(base.rglob("test/*/*.png")) + sorted(base.rglob("train/good/*.png"))
        assert len(images) == 2 + 1 + 4
        assert all(np.asarray(Image.open(p)).shape == (*shape, 3) for p in images)
        for kind in SMALL_DEFECT_TYPES:
            raw = np.asarray(Image.open(base / "ground_truth" / kind / "000_mask.png"))
            assert raw.shape == shape and set(np.unique(raw)) == {0, 255}


def test_small_defects_sizes_and_places(small_tree: Path) -> None:
    areas = {kind: [int(_mask(small_tree, c, kind).sum()) for c in CATEGORIES] for kind in SMALL_DEFECT_TYPES}
    assert max(areas["tiny"]) < min(areas["small"]) and max(areas["small"]) < min(areas["medium"])
    for category in CATEGORIES:
        for kind in ("tiny", "small", "medium"):
            assert _interior_ok(_mask(small_tree, category, kind)), (category, kind)
        border = _mask(small_tree, category, "border")
        assert border[:, 0].any() or border[:, -1].any() or border[0].any() or border[-1].any(), category


def _samples(size: int, count: int, seed: int):
    rng = np.random.default_rng(seed)
    photo, foreign = skdata.brick(), skdata.gravel()
    for _ in range(count):
        img = _random_wide_crop(photo, (307, 512), 200, size, rng)
        yield img, rng, _random_wide_crop(foreign, (0, 512), 100, size, rng)


@pytest.mark.parametrize("size", [32, 160, 768])
def test_masks_are_exactly_the_changed_pixels(size: int) -> None:
    shape = image_shape(size, "small_defects")
    for img, rng, other in _samples(size, 6, size):
        for kind, defect in SMALL_DEFECTS.items():
            out, mask = defect(img, rng, other)
            assert mask.shape == shape and mask.dtype == bool and mask.any(), kind
            assert np.array_equal(out != img, mask), kind
            # also once written as 8 bits: the mask never holds a pixel the image does not show as changed
            written = np.clip(np.rint(out * 255), 0, 255) != np.clip(np.rint(img * 255), 0, 255)
            assert np.array_equal(written, mask), kind


def test_defect_sizes_scale_and_interior_and_border_rules_hold() -> None:
    for size in (160, 768):
        h, w = image_shape(size, "small_defects")
        tiny, small, medium = [], [], []
        for img, rng, other in _samples(size, 15, 100 + size):
            tiny.append(SMALL_DEFECTS["tiny"](img, rng, other)[1])
            small.append(SMALL_DEFECTS["small"](img, rng, other)[1])
            medium.append(SMALL_DEFECTS["medium"](img, rng, other)[1])
            border = SMALL_DEFECTS["border"](img, rng, other)[1]
            rows, cols = np.nonzero(border)
            assert cols.min() == 0 or cols.max() == w - 1 or rows.min() == 0 or rows.max() == h - 1
            frame = (cols < 0.0625 * w) | (cols >= 0.9375 * w) | (rows < 0.0625 * h) | (rows >= 0.9375 * h)
            assert frame.mean() > 0.5  # mostly where a square resize and 7/8 center crop cut it off
            assert 0.002 * h * w <= border.sum() <= 0.012 * h * w
        assert all(_interior_ok(m) for m in tiny + small + medium)
        assert max(m.sum() for m in tiny) < min(m.sum() for m in small)
        assert max(m.sum() for m in small) < min(m.sum() for m in medium)
        if size == 768:  # the stated sizes: 3-6 px spots or 1-2 px wide scratches; 0.05-0.2%; 0.5-1% of the area
            assert max(m.sum() for m in tiny) <= 40
            assert all(0.0004 * h * w <= m.sum() <= 0.0025 * h * w for m in small)
            assert all(0.004 * h * w <= m.sum() <= 0.012 * h * w for m in medium)


def test_wide_crops_stay_in_their_rows_and_landscape() -> None:
    photo = np.repeat(np.arange(512, dtype=np.float64)[:, None], 512, axis=1) / 2
    rng = np.random.default_rng(0)
    for rows in ((0, 307), (307, 512)):
        for _ in range(20):
            crop = _random_wide_crop(photo, rows, 200, 160, rng) * 255.0 * 2
            assert crop.shape == (64, 160)
            assert crop.min() >= rows[0] - 1e-6 and crop.max() <= rows[1] - 1 + 1e-6


def test_check_spec_counts_the_wider_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    check_spec(CATEGORIES, 205, "small_defects")  # 205 x 512 regions: the test rows and all columns
    with pytest.raises(ConfigError, match=r"params key 'embedded_data\.crop'.*206x515.*at most 205"):
        check_spec(("brick",), 206, "small_defects")
    # a narrow photo: the 2.5x width is what limits the crop
    monkeypatch.setitem(TEXTURE_SOURCES, "brick", lambda: np.zeros((600, 400), dtype=np.uint8))
    check_spec(("brick",), 200)
    check_spec(("brick",), 160, "small_defects")
    with pytest.raises(ConfigError, match=r"params key 'embedded_data\.crop'.*161x402.*at most 160"):
        check_spec(("brick",), 161, "small_defects")


def _embedded(default_params: dict, **changes: object) -> dict:
    raw = copy.deepcopy(default_params)
    raw["embedded_data"].update(changes)
    return raw


def test_variant_params(default_params: dict) -> None:
    plain = parse_params(_embedded(default_params, variant="textures")).embedded_data
    assert plain.defect_types == DEFECT_TYPES
    small = parse_params(_embedded(default_params, variant="small_defects")).embedded_data
    assert small.defect_types == SMALL_DEFECT_TYPES  # the standard default list means all of the variant's
    chosen = parse_params(_embedded(default_params, variant="small_defects", defect_types=["border", "tiny"]))
    assert chosen.embedded_data.defect_types == ("border", "tiny")


@pytest.mark.parametrize(("changes", "pattern"), [
    ({"variant": "small"}, r"params key 'embedded_data\.variant' must be one of textures, small_defects"),
    ({"variant": "small_defects", "defect_types": ["tiny", "scratch"]},
     r"params key 'embedded_data\.defect_types': scratch not made by variant small_defects; "
     r"choose from tiny, small, border, medium"),
    ({"defect_types": ["hole", "border"]},
     r"params key 'embedded_data\.defect_types': border not made by variant textures; choose from scratch, hole, "
     r"stain, patch \(or set embedded_data\.variant: small_defects\)"),
    ({"defect_types": ["dent"]}, r"params key 'embedded_data\.defect_types\[0\]' must be one of scratch"),
    ({"variant": "small_defects", "image_size": 24}, r"params key 'embedded_data\.image_size'.*at least 32"),
])
def test_bad_variant_params(default_params: dict, changes: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern) as info:
        parse_params(_embedded(default_params, **changes))
    assert "\n" not in str(info.value)


def test_unknown_variant_or_type_in_code(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown variant"):
        make_category(tmp_path, "brick", TextureSpec(variant="wide"), seed=0)
    with pytest.raises(ValueError, match="of variant small_defects"):
        make_category(tmp_path, "brick", TextureSpec(variant="small_defects", defect_types=("hole",)), seed=0)


def test_prepare_writes_the_variant(tmp_path: Path, default_params: dict) -> None:
    raw = tiny_params(default_params)
    raw["embedded_data"].update(variant="small_defects", image_size=160, crop=64, train=1, test_good=1,
                                categories=["grass"])
    run_prepare(load_params(write_params(raw, tmp_path)))
    out = tmp_path / "data/textures/grass"
    assert sorted(p.name for p in (out / "test").iterdir()) == sorted(["good", *SMALL_DEFECT_TYPES])
    assert np.asarray(Image.open(out / "test/border/000.png")).shape == (64, 160, 3)
