"""Feature stores: round trip, statistics, interrupted extraction resumes, fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from polarocc.data.images import Geometry
from polarocc.errors import MissingOutputError
from polarocc.features import store as fs
from polarocc.features.extract import CategoryExtractor, extract_category, read_category
from polarocc.features.store import FeatureStore

GEOMETRY = Geometry(72, 64)


@pytest.fixture
def runner(lite0) -> CategoryExtractor:
    return CategoryExtractor(lite0, GEOMETRY, batch_size=4, dtype="float16")


def _layout(compressor: str = "zstd") -> fs.StoreLayout:
    return fs.StoreLayout(176, 16, 16, 64, "float16", shard_images=4, compressor=compressor)


def _extract(runner, mvtec_tree: Path, out: Path, **kw) -> dict:
    samples = read_category(mvtec_tree, "brick")
    return extract_category(runner, samples, kw.pop("layout", _layout()), {"name": "lite0"}, out / "final.zarr",
                            out / "partial.zarr", progress=False, **kw)


def test_round_trip(runner, mvtec_tree: Path, tmp_path: Path) -> None:
    computed = _extract(runner, mvtec_tree, tmp_path)
    assert computed == {"train": 2, "test": 2}  # 6 train and 7 test images in shards of 4
    assert not (tmp_path / "partial.zarr").exists()
    store = FeatureStore(tmp_path / "final.zarr")
    features = store.features("train")
    assert features.shape == (6, 176, 16, 16) and features.dtype == np.float16
    assert features.chunks == (1, 176, 16, 16) and features.shards == (4, 176, 16, 16)
    samples = read_category(mvtec_tree, "brick")
    assert store.samples("test") == samples["test"]
    # stored features equal a fresh forward pass, rounded to float16
    images = runner.load(samples["train"][:2])
    with torch.no_grad():
        expected = runner.extractor(torch.from_numpy(images)).numpy().astype(np.float16)
    np.testing.assert_array_equal(features[:2], expected)
    # Gram matrices and sums come from the stored float16 features
    gram, sums = store.gram_stats()
    flat = features[:].astype(np.float64).reshape(6, 176, -1)
    np.testing.assert_allclose(gram, flat @ flat.transpose(0, 2, 1), rtol=1e-12)
    np.testing.assert_allclose(sums, flat.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(store.feature_mean(), flat.mean(axis=(0, 2)), rtol=1e-12)
    masks = store.masks()
    labels = np.array([s.label for s in store.samples("test")])
    assert masks.shape == (7, 64, 64) and masks[labels == 1].any(axis=(1, 2)).all()
    assert not masks[labels == 0].any()


class Interrupt(Exception):
    pass


def test_interrupted_extraction_resumes(runner, mvtec_tree: Path, tmp_path: Path) -> None:
    _extract(runner, mvtec_tree, tmp_path / "clean")
    seen: list[int] = []

    def crash_after_first(shard: int) -> None:
        seen.append(shard)
        raise Interrupt

    with pytest.raises(Interrupt):
        _extract(runner, mvtec_tree, tmp_path / "crashed", on_shard=crash_after_first)
    assert not (tmp_path / "crashed/final.zarr").exists()
    assert (tmp_path / "crashed/partial.zarr").exists()
    resumed = _extract(runner, mvtec_tree, tmp_path / "crashed")
    assert resumed == {"train": 1, "test": 2}  # the shard written before the crash is not recomputed
    clean, crashed = FeatureStore(tmp_path / "clean/final.zarr"), FeatureStore(tmp_path / "crashed/final.zarr")
    for split in ("train", "test"):
        np.testing.assert_array_equal(clean.features(split)[:], crashed.features(split)[:])
    np.testing.assert_array_equal(clean.gram_stats()[0], crashed.gram_stats()[0])


def test_changed_params_never_reuse_partial(runner, mvtec_tree: Path, tmp_path: Path) -> None:
    def crash(_: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        _extract(runner, mvtec_tree, tmp_path, on_shard=crash)
    # Same data, other encoding: the fingerprint differs, so every shard is computed again.
    computed = _extract(runner, mvtec_tree, tmp_path, layout=_layout("blosc"))
    assert computed == {"train": 2, "test": 2}
    group = zarr.open_group(tmp_path / "final.zarr", mode="r")
    assert group.attrs["layout"]["compressor"] == "blosc"


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MissingOutputError, match=r"run the extract stage"):
        FeatureStore(tmp_path / "none.zarr")
    zarr.open_group(tmp_path / "half.zarr", mode="w").attrs["complete"] = False
    with pytest.raises(MissingOutputError, match=r"incomplete"):
        FeatureStore(tmp_path / "half.zarr")
