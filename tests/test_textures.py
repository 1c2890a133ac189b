"""The embedded textures dataset: layout, exact masks, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from polarocc.data.textures import _random_crop, make_textures
from tests.conftest import TINY_SPEC


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
