"""The MVTec-layout reader and image/mask geometry on generated trees."""

from __future__ import annotations

import shutil
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polarocc.data.images import Geometry, load_image, load_mask
from polarocc.data.mvtec import check_files, missing_masks, read_split
from polarocc.errors import DataError


def test_reads_layout(mvtec_tree: Path) -> None:
    train = read_split(mvtec_tree, "brick", "train")
    test = read_split(mvtec_tree, "brick", "test")
    assert len(train) == 6 and all(s.label == 0 and s.mask_path is None for s in train)
    assert len(test) == 3 + 4
    defective = [s for s in test if s.label == 1]
    assert sorted(s.defect_type for s in defective) == ["hole", "patch", "scratch", "stain"]
    for s in defective:
        assert s.mask_path == mvtec_tree / "brick" / "ground_truth" / s.defect_type / f"{s.path.stem}_mask.png"
    check_files(test)


def test_geometry_applies_to_images_and_masks(tmp_path: Path) -> None:
    # A white square in a known place must land at the same pixels of the image and of its mask.
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray((img[..., 0] > 0).astype(np.uint8) * 255).save(tmp_path / "a_mask.png")
    geometry = Geometry(resize=50, crop=40)
    image = load_image(tmp_path / "a.png", geometry)
    mask = load_mask(tmp_path / "a_mask.png", geometry)
    assert image.shape == (40, 40, 3) and mask.shape == (40, 40) and mask.dtype == bool
    assert mask.sum() == 100  # 20x20 square halved, not cut by the crop
    # bilinear resizing softens the edge pixels only
    assert (image[..., 0][mask] > 150).all() and (image[..., 0][~mask] < 100).all()
    assert (image[..., 0][mask] == 255).sum() >= 64


def _copy_category(src: Path, dst: Path) -> Path:
    shutil.copytree(src / "brick", dst / "brick")
    return dst


def test_a_defect_without_a_mask_makes_the_category_image_level(mvtec_tree: Path, tmp_path: Path) -> None:
    root = _copy_category(mvtec_tree, tmp_path)
    (root / "brick/ground_truth/hole/000_mask.png").unlink()
    samples = read_split(root, "brick", "test")
    [hole] = [s for s in samples if s.path.name == "000.png" and s.defect_type == "hole"]
    assert hole.label == 1 and hole.mask_path is None
    assert missing_masks(samples) == {"hole": 1}
    shutil.rmtree(root / "brick/ground_truth")  # no ground_truth/ at all: every defect type
    assert missing_masks(read_split(root, "brick", "test")) == {"hole": 1, "patch": 1, "scratch": 1, "stain": 1}


def test_mask_size_mismatch(mvtec_tree: Path, tmp_path: Path) -> None:
    root = _copy_category(mvtec_tree, tmp_path)
    Image.new("L", (10, 10)).save(root / "brick/ground_truth/stain/000_mask.png")
    with pytest.raises(DataError, match=r"stain/000_mask.png is 10x10 but its image .* is 64x64"):
        check_files(read_split(root, "brick", "test"))


def test_empty_category_and_missing_split(tmp_path: Path) -> None:
    (tmp_path / "empty/train/good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"holds no images"):
        read_split(tmp_path, "empty", "train")
    with pytest.raises(DataError, match=r"test.* does not exist"):
        read_split(tmp_path, "empty", "test")


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad.png"):
        load_image(bad, Geometry(32, 32))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_any_image_mode_becomes_rgb(tmp_path: Path, mode: str) -> None:
    gray = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (32, 1))
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)  # full 16-bit range
    elif mode == "P":
        img = Image.fromarray(np.stack([gray] * 3, -1)).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    else:
        img = Image.fromarray(np.stack([gray] * 3, -1)).convert(mode)
    img.save(tmp_path / "x.png")
    out = load_image(tmp_path / "x.png", Geometry(32, 32))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    # the gray ramp survives the conversion (palette quantisation may shift levels a little)
    assert np.abs(out[..., 0].astype(int) - gray).max() <= 8
    assert np.array_equal(out[..., 0], out[..., 1])


def test_truncated_image_is_found_before_extraction(mvtec_tree: Path, tmp_path: Path) -> None:
    from polarocc.features.extract import read_category

    root = _copy_category(mvtec_tree, tmp_path)
    victim = root / "brick/train/good/003.png"
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DataError, match=r"cannot read image .*train/good/003.png"):
        read_category(root, "brick")


def test_non_binary_mask_is_binarised_with_a_warning(mvtec_tree: Path, tmp_path: Path) -> None:
    root = _copy_category(mvtec_tree, tmp_path)
    mask_path = root / "brick/ground_truth/hole/000_mask.png"
    soft = np.asarray(Image.open(mask_path)).astype(np.uint8) // 2  # values 0 and 127
    soft[0, 0] = 30
    Image.fromarray(soft).save(mask_path)
    with pytest.warns(UserWarning, match=r"hole/000_mask.png is not binary .*binarised"):
        check_files(read_split(root, "brick", "test"), progress=False)
    mask = load_mask(mask_path, Geometry(64, 64))
    assert mask.dtype == bool and mask.sum() == (soft > 0).sum()


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A 1-bit grayscale PNG that claims ``width`` x ``height`` pixels in 89 bytes (its pixel data is cut short):
    enough for Pillow's size check, which runs before any decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(64)))
                     + chunk(b"IEND", b""))


def test_decompression_bomb_is_a_data_error(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    _png_header_only(huge, 20000, 20000)  # 400 megapixels, over Pillow's default hard limit
    with pytest.raises(DataError, match=r"image .*huge.png is too large to decode \(400 megapixels\).*downscale") \
            as err:
        load_image(huge, Geometry(32, 32))
    assert "\n" not in str(err.value)


def test_decompression_limits_with_small_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    Image.new("P", (30, 30)).save(path)  # 900 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)  # hard limit: twice that, 800 pixels
    with pytest.raises(DataError, match=r"big.png is too large to decode \(900 pixels\): .*over 800 pixels"):
        load_mask(path, Geometry(32, 32))
    # between the limit and twice it Pillow only warns, and the image loads
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    with pytest.warns(Image.DecompressionBombWarning):
        assert load_image(path, Geometry(32, 32)).shape == (32, 32, 3)
    # where warnings are errors (python -W error) the warning becomes a DataError, not a traceback
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"big.png is too large to decode"):
            load_image(path, Geometry(32, 32))
