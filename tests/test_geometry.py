"""Input geometry: params forms, resolution per image size, tile layout, and image/mask alignment at every form."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polarocc.config import ConfigError, parse_params
from polarocc.data.images import load_image, load_mask, resize_crop
from polarocc.geometry import Geometry, GeometrySpec, Tiles, parse_option

# Every form the params allow, on a 1:2.5 image of 100 x 250 px (height x width).
IMAGE = (100, 250)
FORMS = {
    "paper": GeometrySpec.parse(256, 224),
    "rectangle": GeometrySpec.parse([80, 200], [72, 192]),
    "full_frame": GeometrySpec.parse({"longer_side": 200}, None),
    "shorter_side": GeometrySpec.parse({"shorter_side": 64}, None),
    "tiled": GeometrySpec.parse({"longer_side": 250}, None, {"size": 64, "overlap": 0.25}),
}


def test_the_paper_geometry_keeps_its_record() -> None:
    """Stores and models of the default geometry keep the form (and so the fingerprints) they had before."""
    geometry = GeometrySpec.parse(256, 224).resolve()
    assert geometry.record() == {"resize": 256, "crop": 224}
    assert geometry.size == (224, 224) and geometry.box() == (16, 16, 240, 240)
    assert Geometry.from_record(geometry.record()) == geometry == Geometry(256, 224)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_record_round_trip(name: str) -> None:
    geometry = FORMS[name].resolve(IMAGE)
    assert Geometry.from_record(geometry.record()) == geometry


def test_aspect_preserving_resize_follows_the_reference_image() -> None:
    assert FORMS["full_frame"].resolve(IMAGE).size == (80, 200)
    assert FORMS["shorter_side"].resolve(IMAGE).size == (64, 160)
    assert FORMS["full_frame"].resolve((250, 100)).size == (200, 80)  # portrait stays portrait
    assert FORMS["rectangle"].resolve(IMAGE).box() == (4, 4, 196, 76)
    with pytest.raises(ValueError, match="reference image"):
        FORMS["full_frame"].resolve()


@pytest.mark.parametrize(("length", "size", "overlap", "expected"), [
    (64, 64, 0.25, [0]),                      # one tile covers it
    (250, 64, 0.25, [0, 48, 96, 140, 188]),   # steps <= 48 px, each a multiple of the stride 4
    (250, 64, 0.0, [0, 64, 124, 188]),
    (128, 64, 0.5, [0, 32, 64]),
    (130, 64, 0.0, [0, 32, 68]),              # the last tile reaches 2 px past the end (padded by the extractor)
])
def test_tile_offsets(length: int, size: int, overlap: float, expected: list[int]) -> None:
    offsets = Tiles(size, overlap).offsets(length, 4)
    assert offsets == expected
    assert all(o % 4 == 0 for o in offsets)
    assert offsets[-1] + size >= length > offsets[-1] + size - 4
    assert all(b - a <= size * (1 - overlap) for a, b in itertools.pairwise(offsets))


@pytest.mark.parametrize(("text", "option", "value"), [
    ("256", "--resize", 256), ("307x768", "--resize", [307, 768]), ("longer:768", "--resize", {"longer_side": 768}),
    ("shorter:512", "--resize", {"shorter_side": 512}), ("none", "--crop", None), ("224", "--crop", 224),
    ("224:0.5", "--tiles", {"size": 224, "overlap": 0.5}), ("224", "--tiles", {"size": 224, "overlap": 0.25}),
    ("none", "--tiles", None),
])
def test_command_line_forms(text: str, option: str, value: object) -> None:
    assert parse_option(text, option) == value


@pytest.mark.parametrize(("text", "option"), [("wide:5", "--resize"), ("axb", "--crop"), ("big", "--tiles")])
def test_bad_command_line_forms_name_the_option(text: str, option: str) -> None:
    with pytest.raises(ConfigError, match=option):
        parse_option(text, option)


@pytest.mark.parametrize(("change", "key"), [
    ({"resize": {"width": 300}}, "backbone.resize"),
    ({"resize": {"longer_side": 0}}, "backbone.resize"),
    ({"resize": [0, 5]}, "backbone.resize"),
    ({"resize": [256, 256, 3]}, "backbone.resize"),
    ({"resize": "big"}, "backbone.resize"),
    ({"crop": [224]}, "backbone.crop"),
    ({"crop": "none"}, "backbone.crop"),
    ({"resize": [256, 300], "crop": [224, 320]}, "backbone.crop"),   # crop wider than the resized image
    ({"crop": 300}, "backbone.crop"),
    ({"tiles": 224}, "backbone.tiles"),
    ({"tiles": {"size": 16}}, "backbone.tiles.size"),
    ({"tiles": {"size": 224, "overlap": 1.0}}, "backbone.tiles.overlap"),
    ({"tiles": {"size": 224, "stride": 2}}, "backbone.tiles.stride"),
    ({"crop": None, "tiles": {"size": 512}}, "backbone.tiles.size"),  # larger than the 256 px input
])
def test_bad_geometry_params_are_refused_by_key(default_params: dict, change: dict, key: str) -> None:
    raw = {**default_params, "backbone": {**default_params["backbone"], **change}}
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_params(raw)


def test_a_crop_that_does_not_fit_the_reference_image_names_it() -> None:
    spec = GeometrySpec.parse({"longer_side": 200}, 100)
    with pytest.raises(ConfigError, match=r"backbone.crop.*80x200.*first image"):
        spec.resolve(IMAGE, "first image")


def _marked_image(tmp_path: Path, box: tuple[int, int, int, int]) -> tuple[Path, Path]:
    """A mid-gray 100 x 250 image with a black rectangle at ``box`` (left, top, right, bottom) and its mask."""
    image = np.full((*IMAGE, 3), 160, dtype=np.uint8)
    mask = np.zeros(IMAGE, dtype=np.uint8)
    left, top, right, bottom = box
    image[top:bottom, left:right] = 0
    mask[top:bottom, left:right] = 255
    Image.fromarray(image).save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "image.png", tmp_path / "mask.png"


@pytest.mark.parametrize("name", sorted(FORMS))
@pytest.mark.parametrize("box", [(110, 40, 140, 60), (0, 30, 3, 70), (246, 0, 250, 25)], ids=["inside", "left",
                                                                                                "corner"])
def test_masks_follow_the_images(tmp_path: Path, name: str, box: tuple[int, int, int, int]) -> None:
    """The defect's dark pixels and its mask land on the same pixels of the model input, at every geometry; a
    defect in the margin a center crop cuts is cut from both."""
    image_path, mask_path = _marked_image(tmp_path, box)
    geometry = FORMS[name].resolve(IMAGE)
    image, mask = load_image(image_path, geometry), load_mask(mask_path, geometry)
    assert image.shape[:2] == mask.shape == geometry.size
    dark = image[..., 0] < 80
    assert dark.any() == mask.any()
    if mask.any():
        # Bilinear vs nearest resampling: the two agree up to one pixel at the edges.
        assert (dark & ~mask).sum() <= 2 * (mask.shape[0] + mask.shape[1]) and (mask & ~dark).sum() <= \
            2 * (mask.shape[0] + mask.shape[1])
        ys, xs = np.nonzero(mask)
        dys, dxs = np.nonzero(dark)
        assert abs(ys.mean() - dys.mean()) < 1 and abs(xs.mean() - dxs.mean()) < 1
    # Only a crop loses the border defects (each lies inside the narrowest cut margin here: 5 px of 250).
    assert mask.any() == (geometry.crop is None or box == (110, 40, 140, 60))
    np.testing.assert_array_equal(resize_crop(np.asarray(Image.open(image_path)), geometry), image)
