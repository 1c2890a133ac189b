"""NaN or Inf stops extraction and training with a message naming the image or the variant."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from polarocc import layout
from polarocc.config import load_params
from polarocc.data.images import Geometry
from polarocc.detector.stores import fit_store
from polarocc.errors import NumericalError
from polarocc.features import store as fs
from polarocc.features.extract import CategoryExtractor, extract_category, read_category
from polarocc.features.store import FeatureStore


class _Overflowing(CategoryExtractor):
    """Features as a float16 cache would overflow them, for one chosen image."""

    def __init__(self, runner: CategoryExtractor, bad_name: str) -> None:
        self.__dict__.update(runner.__dict__)
        self.bad_name = bad_name
        self.loaded = {}  # images array -> its samples (loading runs a shard ahead, in a thread)

    def load(self, samples):
        images = super().load(samples)
        self.loaded[id(images)] = samples
        return images

    def features(self, images):
        out = super().features(images)
        for i, sample in enumerate(self.loaded[id(images)]):
            if sample.path.name == self.bad_name and sample.label == 0:
                out[i, 0, 0, 0] = np.inf
        return out


def test_inf_features_stop_extraction_naming_the_image(lite0, mvtec_tree: Path, tmp_path: Path) -> None:
    runner = _Overflowing(CategoryExtractor(lite0, Geometry(72, 64), batch_size=4, dtype="float16"), "005.png")
    layout = fs.StoreLayout(176, 16, 16, 64, "float16", shard_images=4)
    samples = read_category(mvtec_tree, "brick")
    with pytest.raises(NumericalError, match=r"brick/train/good/005\.png contain NaN or Inf"):
        extract_category(runner, samples, layout, {"name": "lite0"}, tmp_path / "final.zarr", tmp_path / "p.zarr",
                         progress=False)
    assert not (tmp_path / "final.zarr").exists()
    assert fs.pending_shards(fs.zarr.open_group(tmp_path / "p.zarr", mode="r"), "train") == [1]  # shard 0 kept


def test_diverging_training_names_the_variant(extracted_project: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(extracted_project, project)
    params = load_params(project / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    with pytest.raises(NumericalError, match=r"brick\.zarr with the ones center of norm 1e\+200: training loss "
                                             r"became inf at epoch 1"):
        fit_store(store, params, 1e200, ("ones",))


def test_gram_statistics_read_from_disk_train_the_same_bits(extracted_project: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    import torch

    from polarocc.pipeline.extract import run_extract

    project = tmp_path / "project"
    shutil.copytree(extracted_project, project)
    params = load_params(project / "params.yaml")
    params = replace(params, train=replace(params.train, statistics="stored"))
    run_extract(params, "mine", progress=False)
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    gram, _ = store.gram_stats(memory_bytes=2 ** 20)  # 6 x 176 x 176 float64 = 1.5 MB: stays on disk
    assert not isinstance(gram, np.ndarray)
    np.testing.assert_allclose(store.gram_total(), store.gram_stats()[0].sum(0), rtol=1e-12)
    in_memory = fit_store(store, params, 1.0, ("normal",))["normal"][0]
    lazy = replace(params, train=replace(params.train, stats_memory_mb=1))
    on_disk = fit_store(store, lazy, 1.0, ("normal",))["normal"][0]
    assert torch.equal(in_memory.weight, on_disk.weight) and torch.equal(in_memory.bias, on_disk.bias)
