"""Work split into chunks or run side by side gives the results of doing it whole and in turn."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from polarocc import layout
from polarocc.analysis.polar import PolarAccumulator
from polarocc.config import load_params
from polarocc.detector import stores as score_module
from polarocc.detector.model_files import load_model
from polarocc.detector.stores import fit_store, pixel_accumulators, score_store
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.pipeline import train as train_module
from polarocc.pipeline.train import run_train
from polarocc.scoring.maps import chunk_images
from polarocc.scoring.pixel_metrics import ExactPixelMetrics, result_workers, results_of
from polarocc.training.threads import in_order


def test_chunk_images_fits_the_chunk_budget() -> None:
    assert chunk_images(1792, 56, 56) == 1  # 22.5 MB of float32 per image: one at a time
    assert chunk_images(176, 56, 56) == 7
    assert chunk_images(4, 1, 1) == 16 * 2 ** 20 // 16


def test_scoring_a_few_images_at_a_time_equals_scoring_whole_shards(project_copy: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_params(project_copy / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    torch.manual_seed(0)
    channels = store.channels
    projector = Projector(channels, "conv1x1", True, seed=3)
    center = torch.randn(channels)

    def run() -> tuple[np.ndarray, dict, dict]:
        [pixel] = pixel_accumulators(store, 1, params.score)
        polar = [PolarAccumulator(center)]
        [scores] = score_store(store, [(projector, center)], params.score, pixel=[pixel], polar=polar)
        return scores, pixel.result(), polar[0].summary()

    monkeypatch.setattr(score_module, "chunk_images", lambda *_: 10 ** 6)
    whole = run()
    n_test = store.features("test").shape[0]
    assert len(whole[0]) == n_test
    for step in (1, 3):  # 3: a partial last chunk
        assert n_test % 3
        monkeypatch.setattr(score_module, "chunk_images", lambda *_, step=step: step)
        chunked = run()
        np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
        for key in ("pixel_auroc", "aupro", "pixel_f1_max"):
            assert chunked[1][key] == pytest.approx(whole[1][key], abs=1e-6)
        assert chunked[2]["normal"]["count"] == whole[2]["normal"]["count"] > 0
        assert chunked[2]["cosine_normal_anomalous"] == pytest.approx(whole[2]["cosine_normal_anomalous"], abs=1e-5)


def test_pixel_results_side_by_side_equal_those_in_turn() -> None:
    rng = np.random.default_rng(4)
    accumulators = [ExactPixelMetrics() for _ in range(3)]
    masks = rng.random((4, 16, 16)) < 0.1
    for accumulator in accumulators:
        accumulator.add(rng.random((4, 16, 16)).astype(np.float32) + masks, masks)
    in_turn = [a.result() for a in accumulators]
    assert results_of(accumulators, masks.size, memory_mb=64) == in_turn  # room for every core
    assert results_of(accumulators, masks.size, memory_mb=0) == in_turn  # no room: one at a time
    pixels = 10 ** 6  # 9 MB kept and 72 MB computing per model and million pixels
    assert result_workers(3, 3, pixels, memory_mb=(3 * 9 + 72) * pixels / 2 ** 20) == 1
    assert result_workers(3, 3, pixels, memory_mb=(3 * 9 + 2 * 72) * pixels / 2 ** 20) == min(2, os.cpu_count() or 1)


def test_categories_trained_side_by_side_equal_those_trained_in_turn(project_copy: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    params = load_params(project_copy / "params.yaml")
    used: list[int] = []

    def spy(work, items, workers):
        used.append(workers)
        return in_order(work, items, workers)

    monkeypatch.setattr(train_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(train_module, "in_order", spy)
    threads = torch.get_num_threads()
    run_train(params, 2.0, progress=False)
    assert used[0] == 2 and torch.get_num_threads() == threads  # side by side, and the setting is restored
    for category in params.datasets["mine"].categories:
        store = FeatureStore(layout.feature_store(params, "mine", category))
        alone = fit_store(store, params, 2.0, params.sweep.distributions)
        for distribution, (projector, center, _) in alone.items():
            saved, saved_center, _ = load_model(layout.model_file(params, 2.0, distribution, "mine", category), store)
            assert torch.equal(saved.weight, projector.weight.detach().float())
            assert torch.equal(saved.bias, projector.bias.detach().float())
            assert torch.equal(saved_center, center)
