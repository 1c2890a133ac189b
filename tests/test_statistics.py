"""Training statistics stored or streamed, every variant in lockstep: the same weights as the direct trainer."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from polarocc import layout
from polarocc.config import Params, TrainConfig, load_params
from polarocc.detector.stores import fit_store
from polarocc.errors import MissingOutputError
from polarocc.features.budget import (
    STORED,
    STREAMED,
    feature_bytes_per_image,
    resolve_statistics,
    statistics_bytes_per_image,
)
from polarocc.features.extract import gram_and_sums
from polarocc.features.store import FeatureStore, read_rows
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.pipeline.extract import run_extract
from polarocc.training.direct import train_direct
from polarocc.training.gram import train_gram, train_lockstep
from polarocc.training.statistics import StoredStatistics, StreamedStatistics, gram_of


def _project(extracted_project: Path, tmp_path: Path, statistics: str) -> Params:
    project = tmp_path / statistics
    shutil.copytree(extracted_project, project)
    params = load_params(project / "params.yaml")
    # A large lr moves the trajectories far from the start, so agreement is not agreement of initial weights.
    params = replace(params, train=replace(params.train, statistics=statistics, dtype="float64", lr=1e-2,
                                           device="cpu"))
    run_extract(params, "mine", progress=False)
    return params


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


def test_stored_streamed_and_direct_give_the_same_weights(extracted_project: Path, tmp_path: Path) -> None:
    stored_params = _project(extracted_project, tmp_path, STORED)
    streamed_params = _project(extracted_project, tmp_path, STREAMED)
    stored_store = FeatureStore(layout.feature_store(stored_params, "mine", "brick"))
    streamed_store = FeatureStore(layout.feature_store(streamed_params, "mine", "brick"))
    assert stored_store.has_stored_statistics and not streamed_store.has_stored_statistics
    np.testing.assert_array_equal(stored_store.features("train")[:], streamed_store.features("train")[:])

    distributions = ("normal", "ones", "uniform")
    stored = fit_store(stored_store, stored_params, 1.0, distributions)
    streamed = fit_store(streamed_store, streamed_params, 1.0, distributions)
    direct_params = replace(stored_params, train=replace(stored_params.train, trainer="direct"))
    direct = fit_store(stored_store, direct_params, 1.0, distributions)
    for d in distributions:
        (w_stored, _, h_stored), (w_streamed, _, h_streamed) = stored[d], streamed[d]
        w_direct, _, h_direct = direct[d]
        assert h_stored.trainer == h_streamed.trainer == "gram" and h_direct.trainer == "direct"
        assert "statistics stored" in h_stored.notes and "statistics streamed" in h_streamed.notes
        start = Projector(w_direct.channels, seed=stored_params.train.seed, dtype=torch.float64)
        assert _relative(w_direct.weight, start.weight) > 1e-3  # training moved the weights
        for trained in (w_stored, w_streamed):
            assert _relative(trained.weight, w_direct.weight) <= 1e-10
            assert _relative(trained.bias, w_direct.bias) <= 1e-10
        np.testing.assert_allclose(h_streamed.loss, h_direct.loss, rtol=1e-10)


def test_training_on_part_of_a_store_equals_training_on_those_images_alone(extracted_project: Path,
                                                                          tmp_path: Path) -> None:
    # What export does for its held-out calibration: the same rows through stored statistics, streamed ones, and
    # the direct trainer on exactly those features in memory.
    stored_params = _project(extracted_project, tmp_path, STORED)
    streamed_params = _project(extracted_project, tmp_path, STREAMED)
    rows = np.array([0, 2, 3, 5])
    stored_store = FeatureStore(layout.feature_store(stored_params, "mine", "brick"))
    streamed_store = FeatureStore(layout.feature_store(streamed_params, "mine", "brick"))
    distributions = ("normal", "feature_mean")
    stored = fit_store(stored_store, stored_params, 1.0, distributions, rows=rows)
    streamed = fit_store(streamed_store, streamed_params, 1.0, distributions, rows=rows)
    own = stored_store.features("train")[:][rows]
    cfg = replace(stored_params.train, trainer="direct")
    for d in distributions:
        (w_stored, c_stored, h_stored), (w_streamed, _, h_streamed) = stored[d], streamed[d]
        assert "statistics stored" in h_stored.notes and "statistics streamed" in h_streamed.notes
        reference = Projector(w_stored.channels, seed=cfg.seed, dtype=torch.float64)
        train_direct(reference, c_stored, lambda idx: own[np.sort(idx)], len(own), cfg)
        for trained in (w_stored, w_streamed):
            assert _relative(trained.weight, reference.weight) <= 1e-10
    mean = own.astype(np.float64).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(stored["feature_mean"][1].numpy(), mean / np.linalg.norm(mean), rtol=1e-6)


def test_stored_statistics_requested_of_a_streamed_store_is_a_clear_error(extracted_project: Path,
                                                                          tmp_path: Path) -> None:
    params = _project(extracted_project, tmp_path, STREAMED)
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    stored = replace(params, train=replace(params.train, statistics=STORED))
    with pytest.raises(MissingOutputError, match=r"train.statistics is 'stored' but .*brick.zarr was extracted "
                                                 r"without per-image statistics"):
        fit_store(store, stored, 1.0, ("normal",))


def test_auto_stores_statistics_only_when_they_cost_at_most_half_the_features() -> None:
    assert resolve_statistics("auto", 176, 56, 56) == STORED  # Lite0 layers 1-3
    assert resolve_statistics("auto", 1792, 56, 56) == STREAMED  # Wide-ResNet50 layers 1-3
    assert resolve_statistics("streamed", 176, 56, 56) == STREAMED
    assert resolve_statistics("stored", 1792, 56, 56) == STORED
    assert statistics_bytes_per_image(1792) == (1792 * 1792 + 1792) * 8  # 25.7 MB
    assert feature_bytes_per_image(1792, 56, 56) == 1792 * 56 * 56 * 2  # 11.2 MB
    # At the boundary (statistics exactly half the features) the statistics are stored.
    channels = 16
    pixels = statistics_bytes_per_image(channels) // (channels * 2) * 2
    assert statistics_bytes_per_image(channels) == 0.5 * feature_bytes_per_image(channels, pixels, 1)
    assert resolve_statistics("auto", channels, pixels, 1) == STORED
    assert resolve_statistics("auto", channels, pixels - 1, 1) == STREAMED


def _features(n: int = 9, c: int = 10, side: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, side, side)) + 0.3).astype(np.float16)


def test_lockstep_variants_equal_separate_runs() -> None:
    features = _features()
    gram, sums = gram_and_sums(features)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=1e-2)
    centers = [make_center(d, 2.0, 10, seed=3) for d in ("normal", "uniform", "ones")]
    separate = []
    for center in centers:
        projector = Projector(10, dtype=torch.float64)
        train_gram(projector, center, gram, sums, 25, cfg)
        separate.append(projector)
    together = [Projector(10, dtype=torch.float64) for _ in centers]
    stats = StoredStatistics(gram, sums, 25, torch.float64)
    seen: list[tuple[int, int]] = []
    histories, problems = train_lockstep(together, centers, stats, len(features), cfg,
                                         on_step=lambda v, images: seen.append((v, images)))
    assert problems == [None] * 3 and [h.steps for h in histories] == [12] * 3
    assert seen[:3] == [(0, 4), (1, 4), (2, 4)] and len(seen) == 36
    for a, b in zip(together, separate, strict=True):
        assert _relative(a.weight, b.weight) <= 1e-12 and _relative(a.bias, b.bias) <= 1e-12
        # Each projector owns its weights after training (a view would save the whole stack).
        assert a.weight.untyped_storage().nbytes() == a.weight.numel() * 8


def test_streamed_batches_equal_summed_per_image_statistics() -> None:
    features = _features(n=7)
    gram, sums = gram_and_sums(features)
    streamed = StreamedStatistics(features, torch.float64)
    batches = [np.array([4, 0, 2]), np.array([6, 1, 3, 5])]
    streamed.plan(batches)
    for batch in batches:
        g, s, n = streamed.batch(batch)
        np.testing.assert_allclose(g.numpy(), gram[batch].sum(0), rtol=1e-13)
        np.testing.assert_allclose(s.numpy(), sums[batch].sum(0), rtol=1e-13)
        assert n == len(batch) * 25
    np.testing.assert_allclose(streamed.epoch_gram().numpy(), gram.sum(0), rtol=1e-13)
    streamed.close()


class _CountingArray:
    """A numpy array that counts the images read through it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.images_read = array, array.shape, array.dtype, 0

    def __getitem__(self, rows: slice) -> np.ndarray:
        block = self.array[rows]
        self.images_read += len(block)
        return block


def test_streamed_features_kept_in_memory_are_read_once_and_give_the_same_bits() -> None:
    features = _features(n=7)
    epochs = [[np.array([4, 0, 2]), np.array([6, 1, 3, 5])], [np.array([1, 5]), np.array([0, 6, 2, 3, 4])]]
    results = {}
    for budget in (0, features.nbytes):
        source = _CountingArray(features)
        streamed = StreamedStatistics(source, torch.float64, memory_bytes=budget)
        assert streamed.keeps_features == (budget > 0)
        results[budget] = []
        for batches in epochs:
            streamed.plan(batches)
            results[budget] += [streamed.batch(b)[0] for b in batches]
        streamed.close()
        assert source.images_read == (7 if budget else 14)
    for kept, read in zip(results[features.nbytes], results[0], strict=True):
        assert torch.equal(kept, read)


def test_read_rows_reads_runs_as_slices_in_ascending_order(tmp_path: Path) -> None:
    import zarr

    data = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    array = zarr.create_array(tmp_path / "a.zarr", shape=data.shape, chunks=(2, 3), shards=(4, 3), dtype="float32")
    array[:] = data
    for rows in ([7, 1, 2, 3, 9], [0], [9, 8], list(range(10))):
        np.testing.assert_array_equal(read_rows(array, np.array(rows)), data[sorted(rows)])
        np.testing.assert_array_equal(read_rows(data, np.array(rows)), data[sorted(rows)])


def test_gram_of_splits_large_batches_without_changing_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    features = torch.from_numpy(_features(n=6))
    whole = gram_of(features)
    monkeypatch.setattr("polarocc.training.statistics.STREAM_BLOCK_BYTES", 1)  # one image at a time
    split = gram_of(features)
    torch.testing.assert_close(split[0], whole[0], rtol=1e-13, atol=0)
    torch.testing.assert_close(split[1], whole[1], rtol=1e-13, atol=0)
