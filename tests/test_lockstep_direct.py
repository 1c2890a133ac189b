"""The direct trainer in lockstep (Protocol A): V variants as one weight stack give each variant's own weights."""

from __future__ import annotations

import copy
import threading
import time

import numpy as np
import pytest
import torch

from polarocc.config import TrainConfig, parse_params
from polarocc.detector import protocol_a
from polarocc.detector.protocol_a import fit_class, fit_variants
from polarocc.errors import NumericalError
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.training.direct import VariantLossDiverged, train_direct, train_direct_lockstep
from polarocc.training.threads import in_order

DISTRIBUTIONS = ("normal", "uniform", "ones", "feature_mean")


def _features(n: int, c: int, side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, side, side)) + 0.4).astype(np.float32)


def _centers(features: np.ndarray, norm: float) -> list[torch.Tensor]:
    return [make_center(d, norm, features.shape[1], seed=3, feature_mean=lambda: features.mean(axis=(0, 2, 3)))
            for d in DISTRIBUTIONS]


@pytest.mark.parametrize(("side", "kind", "bias"), [(1, "conv1x1", True), (1, "linear", False),
                                                    (3, "conv1x1", True), (3, "linear", True),
                                                    (3, "conv1x1", False)])
def test_lockstep_equals_separate_direct_runs_float64(side: int, kind: str, bias: bool) -> None:
    features = _features(11, 8, side)
    cfg = TrainConfig(epochs=5, batch_size=4, lr=2e-2, radius=0.05)  # a large lr: the weights move visibly

    def load(idx: np.ndarray) -> np.ndarray:
        return features[np.sort(idx)]

    centers = _centers(features, 2.0)
    separate, separate_seen = [], []
    for center in centers:
        projector = Projector(8, kind, bias, seed=5, dtype=torch.float64)
        seen: list[int] = []
        history = train_direct(projector, center, load, len(features), cfg, on_step=seen.append)
        separate.append((projector, history))
        separate_seen.append(seen)
    together = [Projector(8, kind, bias, seed=5, dtype=torch.float64) for _ in centers]
    start = together[0].weight.detach().clone()
    calls: list[tuple[int, int]] = []
    histories = train_direct_lockstep(together, centers, load, len(features), cfg,
                                      on_step=lambda v, images: calls.append((v, images)))
    assert [h.steps for h in histories] == [h.steps for _, h in separate] == [5 * 3] * 4
    assert [h.trainer for h in histories] == ["direct"] * 4
    for v in range(len(centers)):
        assert [images for w, images in calls if w == v] == separate_seen[v]
    assert calls[:4] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    for projector, history, (reference, ref_history) in zip(together, histories, separate, strict=True):
        assert (projector.weight - start).abs().max() > 1e-2
        torch.testing.assert_close(projector.weight, reference.weight, rtol=0, atol=1e-12)
        if bias:
            torch.testing.assert_close(projector.bias, reference.bias, rtol=0, atol=1e-12)
        else:
            assert projector.bias is None
        np.testing.assert_allclose(history.loss, ref_history.loss, rtol=1e-12)
        np.testing.assert_allclose(history.weight_norm, ref_history.weight_norm, rtol=1e-12)
        np.testing.assert_allclose(history.bias_gap, ref_history.bias_gap, rtol=1e-12)
        # each projector owns its weights afterwards (a view would keep and save the whole stack)
        assert projector.weight.untyped_storage().nbytes() == projector.weight.numel() * 8


def test_lockstep_hinge_inside_radius_matches_direct() -> None:
    """A radius large enough that some positions lie inside it: the hinge's zero gradient is reproduced too."""
    features = _features(9, 6, 2, seed=4)
    cfg = TrainConfig(epochs=4, batch_size=3, lr=1e-2, radius=2.5)
    centers = _centers(features, 1.0)
    separate = []
    for center in centers:
        projector = Projector(6, seed=2, dtype=torch.float64)
        train_direct(projector, center, lambda idx: features[np.sort(idx)], len(features), cfg)
        separate.append(projector)
    together = [Projector(6, seed=2, dtype=torch.float64) for _ in centers]
    train_direct_lockstep(together, centers, lambda idx: features[np.sort(idx)], len(features), cfg)
    for a, b in zip(together, separate, strict=True):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-12)
        torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-12)


def test_lockstep_observer_sees_each_variants_live_weights() -> None:
    features = _features(6, 5, 1, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=2, lr=1e-2)
    centers = _centers(features, 1.0)[:2]
    reference = []
    for center in centers:
        projector = Projector(5, dtype=torch.float64)
        snapshots: list[torch.Tensor] = []
        train_direct(projector, center, lambda idx: features[np.sort(idx)], len(features), cfg,
                     on_step=lambda _, p=projector, s=snapshots: s.append(p.weight.detach().clone()))
        reference.append(snapshots)
    together = [Projector(5, dtype=torch.float64) for _ in centers]
    seen: list[list[torch.Tensor]] = [[], []]
    train_direct_lockstep(together, centers, lambda idx: features[np.sort(idx)], len(features), cfg,
                          on_step=lambda v, _: seen[v].append(together[v].weight.detach().clone()))
    for got, expected in zip(seen, reference, strict=True):
        assert len(got) == len(expected) == 3
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_lockstep_names_the_diverging_variant() -> None:
    features = _features(4, 3, 1)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-2)
    centers = [make_center("normal", 1.0, 3), torch.full((3,), float("inf"))]
    together = [Projector(3, dtype=torch.float64) for _ in centers]
    with pytest.raises(VariantLossDiverged) as info:
        train_direct_lockstep(together, centers, lambda idx: features[np.sort(idx)], len(features), cfg)
    assert info.value.index == 1 and isinstance(info.value, FloatingPointError)


def test_lockstep_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="projectors"):
        train_direct_lockstep([Projector(3)], [], lambda idx: np.zeros((len(idx), 3, 1, 1)), 4, TrainConfig())


def _params(default_params: dict, epochs: int = 6, lr: float = 1e-2):
    raw = copy.deepcopy(default_params)
    raw["train"]["lr"] = lr
    raw["protocol_a"].update(epochs=epochs, batch_size=16)
    return parse_params(raw)


def _labelled(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), [30, 21, 17])
    features = (rng.normal(size=(3, 24))[labels] * 2 + rng.normal(size=(len(labels), 24)))
    return features[:, :, None, None].astype(np.float32), labels


def test_fit_class_equals_its_fit_variants_member(default_params: dict) -> None:
    params = _params(default_params)
    features, labels = _labelled()
    label = 1
    fitted = fit_variants(features, labels, label, params, 2.0, DISTRIBUTIONS)
    assert len(fitted) == len(DISTRIBUTIONS)
    for distribution, (projector, center, history) in zip(DISTRIBUTIONS, fitted, strict=True):
        alone, alone_center, alone_history = fit_class(features, labels, label, params, 2.0, distribution)
        assert torch.equal(center, alone_center)
        assert history.steps == alone_history.steps == 6 * 2  # 21 images, batches of 16
        # float32 (Protocol A's dtype): a 1- and a 4-variant batched product may round differently
        torch.testing.assert_close(projector.weight, alone.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(projector.bias, alone.bias, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(history.loss, alone_history.loss, rtol=1e-5)
        assert (projector.weight - Projector(24, seed=params.train.seed).weight).abs().max() > 1e-3


def test_fit_class_equals_separate_direct_run(default_params: dict) -> None:
    """fit_class is the classic per-model direct trainer on the class's own images (float32)."""
    params = _params(default_params)
    features, labels = _labelled(seed=2)
    own = features[labels == 0]
    projector, center, history = fit_class(features, labels, 0, params, 4.0, "feature_mean")
    reference = Projector(24, params.projector.kind, params.projector.bias, seed=params.train.seed)
    ref_history = train_direct(reference, center, lambda idx: own[np.sort(idx)], len(own),
                               protocol_a.train_config(params))
    torch.testing.assert_close(projector.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(projector.bias, reference.bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.loss, ref_history.loss, rtol=1e-5)
    assert history.steps == ref_history.steps == 6 * 2  # 30 images, batches of 16


def test_fit_variants_names_the_diverging_distribution(default_params: dict, monkeypatch) -> None:
    params = _params(default_params, epochs=1)
    features, labels = _labelled()
    real_center = protocol_a.class_center

    def center(own, distribution, norm, seed):
        return torch.full((own.shape[1],), float("nan")) if distribution == "ones" else real_center(
            own, distribution, norm, seed)

    monkeypatch.setattr(protocol_a, "class_center", center)
    with pytest.raises(NumericalError, match=r"class index 0 with the ones center"):
        fit_variants(features, labels, 0, params, 1.0, ("normal", "ones"))


def _fake_store(monkeypatch: pytest.MonkeyPatch, features: np.ndarray, labels: np.ndarray) -> None:
    """fit_all reads these features and labels as the training split of its one dataset."""
    names = [str(k) for k in range(int(labels.max()) + 1)]
    monkeypatch.setattr(protocol_a, "FeatureStore", lambda path: "store")
    monkeypatch.setattr(protocol_a, "load_split", lambda store, split: (features, labels, None))
    monkeypatch.setattr(protocol_a, "chosen_classes", lambda store, ds: [(n, k) for k, n in enumerate(names)])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fit_all_classes_side_by_side_equal_fit_variants(default_params: dict, monkeypatch: pytest.MonkeyPatch,
                                                         threads: int) -> None:
    params = _params(default_params, epochs=3)
    features, labels = _labelled(seed=4)
    _fake_store(monkeypatch, features, labels)
    monkeypatch.setattr(protocol_a, "threads_for", lambda *_, **__: 1)
    expected = {label: fit_variants(features, labels, label, params, 2.0, params.sweep.distributions)
                for label in range(3)}
    monkeypatch.setattr(protocol_a, "threads_for", lambda *_, **__: threads)  # 1: in turn; 2, 3: side by side
    inner = protocol_a._train_variants
    seen: list[tuple[str, int]] = []

    def recording(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return inner(*args, **kwargs)

    monkeypatch.setattr(protocol_a, "_train_variants", recording)
    before = torch.get_num_threads()
    got = list(protocol_a.fit_all(params, 2.0))
    assert torch.get_num_threads() == before
    assert all(count == 1 for _, count in seen)  # side by side, each class on one torch thread
    names = {name for name, _ in seen}
    assert len(names) <= min(threads, 3) and (threads == 1) == (names == {"MainThread"})
    assert [(d, name) for d, _, name, *_ in got] == [(d, str(k)) for k in range(3) for d in params.sweep.distributions]
    for distribution, dataset, name, store, projector, center, history in got:
        assert (dataset, store) == ("digits", "store")
        reference, ref_center, ref_history = expected[int(name)][params.sweep.distributions.index(distribution)]
        assert torch.equal(projector.weight, reference.weight) and torch.equal(projector.bias, reference.bias)
        assert torch.equal(center, ref_center) and history.loss == ref_history.loss


def test_in_order_keeps_order_and_bounds_the_lookahead() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(item: int) -> int:
        with lock:
            started.append(item)
        time.sleep(0.01 * (item % 3))
        return item * item

    consumed = []
    for result in in_order(work, list(range(9)), 2):
        with lock:
            consumed.append(result)
            assert len(started) <= len(consumed) + 2  # at most `workers` results ahead of the consumer
    assert consumed == [k * k for k in range(9)] and sorted(started) == list(range(9))


def test_in_order_raises_the_first_error_and_starts_nothing_more() -> None:
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 1:
            raise NumericalError("class 1 diverged")
        return item

    results = in_order(work, list(range(20)), 2)
    assert next(results) == 0
    with pytest.raises(NumericalError, match="class 1"):
        next(results)
    assert len(started) <= 4


def test_score_all_classes_side_by_side_equal_in_turn(default_params: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(default_params, epochs=2)
    features, labels = _labelled(seed=6)
    _fake_store(monkeypatch, features, labels)
    models = {}
    for distribution, _, name, _, projector, center, _ in protocol_a.fit_all(params, 2.0):
        models[(distribution, name)] = (projector, center, {})

    files = {protocol_a.layout.model_file(params, 2.0, d, "digits", name): (d, name) for d, name in models}

    def load_model(path, store):
        assert store == "store"
        return models[files[path]]

    monkeypatch.setattr(protocol_a, "load_model", load_model)
    monkeypatch.setattr(protocol_a, "threads_for", lambda *_, **__: 1)
    in_turn = protocol_a.score_all(params, 2.0)
    monkeypatch.setattr(protocol_a, "threads_for", lambda *_, **__: 2)
    side_by_side = protocol_a.score_all(params, 2.0)
    assert list(in_turn) == list(params.sweep.distributions)
    assert list(in_turn["normal"]["digits"]) == ["0", "1", "2"]
    assert side_by_side == in_turn
    assert 0.5 < in_turn["normal"]["digits"]["1"]["image_auroc"] <= 1.0
