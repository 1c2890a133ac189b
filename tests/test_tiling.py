"""Tiled features: placement, seams, and anomaly maps that land on the defect at every geometry, at each image's
own size (Detector, predict)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from polarocc.cli import app
from polarocc.config import ConfigError
from polarocc.detector.detector import Detector
from polarocc.geometry import Tiles
from polarocc.models.tiling import TiledExtractor, edge_ramp

HEIGHT, WIDTH = 80, 200


def test_one_tile_is_the_plain_extractor(lite0) -> None:
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    tiled = TiledExtractor(lite0, Tiles(64, 0.25))
    torch.testing.assert_close(tiled(images), lite0(images), rtol=1e-6, atol=1e-6)
    assert tiled.spec((64, 64)) == lite0.spec(64)


def test_tiles_land_where_they_were_cut(lite0) -> None:
    """Where a single tile covers a position, the stitched map holds exactly that tile's features."""
    images = torch.randint(0, 256, (2, 64, 200, 3), dtype=torch.uint8)
    tiled = TiledExtractor(lite0, Tiles(64, 0.25))
    rows, columns, stride = tiled.layout(64, 200)
    assert (rows, stride) == ([0], 4) and columns == [0, 44, 92, 136]
    stitched = tiled(images)
    assert tuple(stitched.shape[1:]) == (176, 16, 50) == (tiled.spec((64, 200)).channels, 16, 50)
    first, last = lite0(images[:, :, :64].contiguous()), lite0(images[:, :, 136:].contiguous())
    # Positions 0..10 (px 0..43) see only the first tile; 39..49 (px 156..199) only the last.
    torch.testing.assert_close(stitched[..., :11], first[..., :11], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stitched[..., 39:], last[..., 5:], rtol=1e-5, atol=1e-5)


def test_an_input_not_a_multiple_of_the_stride_is_padded_not_cropped(lite0) -> None:
    tiled = TiledExtractor(lite0, Tiles(64, 0.0))
    assert tiled.layout(64, 130)[1] == [0, 32, 68]  # the last tile reaches 2 px past the edge
    out = tiled(torch.randint(0, 256, (1, 64, 130, 3), dtype=torch.uint8))
    assert out.shape[-1] == 33 == tiled.spec((64, 130)).width  # ceil(130 / 4), as a single forward gives


def test_edge_ramp() -> None:
    ramp = edge_ramp(16, True, False)
    assert ramp[-8:].eq(1).all() and (ramp[:8].diff() > 0).all() and ramp[0] > 0
    assert edge_ramp(16, False, False).eq(1).all()
    torch.testing.assert_close(edge_ramp(16, True, True), edge_ramp(16, True, True).flip(0))


def _step_profile(features: torch.Tensor) -> torch.Tensor:
    """Relative change between horizontally neighbouring positions along the middle row: (W - 1,)."""
    row = features[0, :, features.shape[2] // 2, :]
    return (row[:, 1:] - row[:, :-1]).norm(dim=0) / row.norm(dim=0).mean()


def test_a_constant_image_has_no_seams(lite0) -> None:
    """A CNN's features near a tile edge come from zero padding; averaging the overlaps with equal weights leaves
    a step at every tile border. The edge ramps make the stitched map cross tile borders without one: inside
    the image no neighbouring positions differ by more than a small fraction, far less than the plain average's
    steps, and the anomaly map of an (untrained) projector inherits that."""
    image = torch.full((1, 224, 672, 3), 128, dtype=torch.uint8)
    size = 224
    tiled = TiledExtractor(lite0, Tiles(size, 0.5))
    rows, columns, stride = tiled.layout(224, 672)
    stitched = tiled(image)

    # The same tiles averaged with equal weights, for comparison.
    tile = size // stride
    total = torch.zeros_like(stitched)
    count = torch.zeros(stitched.shape[-2:])
    for top in rows:
        for left in columns:
            y, x = top // stride, left // stride
            total[..., y:y + tile, x:x + tile] += lite0(image[:, top:top + size, left:left + size].contiguous())
            count[y:y + tile, x:x + tile] += 1
    plain = total / count

    inner = slice(4, -4)  # the image's own borders have padding effects in a single forward too
    seams = [left // stride for left in columns[1:]] + [(left + size) // stride for left in columns[:-1]]
    ramped, averaged = _step_profile(stitched)[inner], _step_profile(plain)[inner]
    assert averaged.max() > 0.1, "the comparison must show seams, or the test proves nothing"
    assert ramped.max() < 0.3 * averaged.max()
    assert ramped[16:-16].max() < 0.03  # away from the image borders, flat across every seam
    # At the tile borders themselves, the plain average jumps; the ramped map does not.
    at_seams = [s - 1 - 4 for s in seams if 4 < s < stitched.shape[-1] - 4]
    assert _step_profile(plain)[inner][at_seams].max() > 3 * _step_profile(stitched)[inner][at_seams].max()

    from polarocc.models.projector import Projector
    from polarocc.scoring.maps import distance_maps

    projector, center = Projector(176, seed=3), torch.randn(176)
    distances = distance_maps(projector, center, stitched.float())[0, 28, 4:-4]
    plain_distances = distance_maps(projector, center, plain.float())[0, 28, 4:-4]
    assert (distances.diff().abs().max() / distances.mean()) < 0.3 * (plain_distances.diff().abs().max()
                                                                       / plain_distances.mean())


def test_tiles_larger_than_the_input_are_refused(lite0) -> None:
    with pytest.raises(ConfigError, match=r"backbone\.tiles\.size"):
        TiledExtractor(lite0, Tiles(128, 0.25)).spec((64, 200))


def test_a_tile_size_off_the_feature_grid_is_refused(lite0) -> None:
    with pytest.raises(ConfigError, match=r"backbone.tiles.size.*multiple of 32"):
        TiledExtractor(lite0, Tiles(98, 0.25)).spec((128, 200))


# -- anomaly maps on the defect, at every geometry -----------------------------------------------------------------
GEOMETRIES = {
    "paper": {"resize": 96, "crop": 84},  # square resize and a 7/8 center crop, as 256/224
    "full_frame": {"resize": {"longer_side": WIDTH}, "crop": None},
    "tiled": {"resize": {"longer_side": WIDTH}, "crop": None, "tiles": {"size": 64, "overlap": 0.25}},
}
DEFECTS = {"inside": (92, 32, 108, 48), "border": (0, 30, 8, 50)}  # (left, top, right, bottom) at 80 x 200


def _normal(rng: np.random.Generator) -> np.ndarray:
    """Smooth gray noise, 80 x 200."""
    coarse = rng.normal(150, 12, size=(HEIGHT // 4, WIDTH // 4)).astype(np.float32)
    image = np.asarray(Image.fromarray(coarse, mode="F").resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _with_defect(image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    out = image.copy()
    left, top, right, bottom = box
    out[top:bottom, left:right] = 20
    return out


@pytest.fixture(scope="module")
def detectors() -> dict[str, Detector]:
    rng = np.random.default_rng(0)
    normal = [_normal(rng) for _ in range(10)]
    return {name: Detector(epochs=10, lr=1e-3, holdout=0, progress=False, **geometry).fit(normal)
            for name, geometry in GEOMETRIES.items()}


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_the_map_peaks_on_the_defect(detectors: dict[str, Detector], name: str, defect: str) -> None:
    """The anomaly map, returned at the image's own size, peaks on a defect at a known position; a defect in the
    margin the paper's center crop cuts off is invisible to that geometry only."""
    box = DEFECTS[defect]
    image = _with_defect(_normal(np.random.default_rng(1)), box)
    _scores, maps = detectors[name].score_and_maps([image])
    assert maps[0].shape == (HEIGHT, WIDTH)
    y, x = np.unravel_index(int(maps[0].argmax()), maps[0].shape)
    left, top, right, bottom = box
    on_defect = left - 6 <= x < right + 6 and top - 6 <= y < bottom + 6
    assert on_defect == (name != "paper" or defect == "inside"), (name, defect, (x, y))


def test_saved_geometry_round_trips(detectors: dict[str, Detector], tmp_path: Path) -> None:
    image = _with_defect(_normal(np.random.default_rng(2)), DEFECTS["border"])
    for name, detector in detectors.items():
        loaded = Detector.load(detector.save(tmp_path / f"{name}.pt"), progress=False)
        assert loaded.geometry == detector.geometry
        for key in ("resize", "crop", "tiles"):  # the parameters as given (aspect kept), not the resolved size
            assert loaded.get_params()[key] == GEOMETRIES[name].get(key), key
        np.testing.assert_allclose(loaded.score([image]), detector.score([image]), rtol=1e-6)


def test_predict_writes_maps_at_each_image_size(detectors: dict[str, Detector], tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    sizes = {"wide.png": (HEIGHT, WIDTH), "small.png": (40, 100), "square.png": (90, 90)}
    for file, (height, width) in sizes.items():
        Image.fromarray(_normal(rng)).resize((width, height)).save(images / file)
    model = detectors["tiled"].save(tmp_path / "tiled.pt")
    result = CliRunner().invoke(app, ["predict", str(model), str(images), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for file, size in sizes.items():
        stem = Path(file).stem
        assert np.load(tmp_path / "out" / "maps" / f"{stem}.npy").shape == size
        assert Image.open(tmp_path / "out" / "overlays" / f"{stem}.png").size[0] >= size[1]


def test_a_given_tiled_extractor_is_retiled_as_the_model_was(detectors: dict[str, Detector], lite0,
                                                              tmp_path: Path) -> None:
    image = _with_defect(_normal(np.random.default_rng(4)), DEFECTS["inside"])
    path = detectors["tiled"].save(tmp_path / "tiled.pt")
    other = Detector.load(path, extractor=TiledExtractor(lite0, Tiles(128, 0.5)), progress=False)
    assert other.extractor.tiles == Tiles(64, 0.25)
    np.testing.assert_allclose(other.score([image]), detectors["tiled"].score([image]), rtol=1e-6)
