"""The Gram trainer follows the direct trainer's Adam trajectory, and knows where it stops being exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polarocc.config import TrainConfig
from polarocc.features.extract import gram_and_sums
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.training.certify import certified_min_distance_sq
from polarocc.training.direct import hinge_loss, train_direct
from polarocc.training.gram import ShortcutInvalid, train_gram
from polarocc.training.optim import Adam
from polarocc.training.schedule import epoch_batches


def _features(n: int = 10, c: int = 12, side: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, c, side, side)) + 0.5).astype(np.float16)


@pytest.mark.parametrize("kind", ["conv1x1", "linear"])
@pytest.mark.parametrize("bias", [True, False])
def test_gram_matches_direct_float64(kind: str, bias: bool) -> None:
    features = _features()
    gram, sums = gram_and_sums(features)
    cfg = TrainConfig(epochs=6, batch_size=4, lr=1e-2)  # a large lr makes the trajectories move visibly
    center = make_center("normal", 2.0, features.shape[1])
    by_gram = Projector(features.shape[1], kind, bias, dtype=torch.float64)
    by_direct = Projector(features.shape[1], kind, bias, dtype=torch.float64)
    start = by_gram.weight.detach().clone()
    h_gram = train_gram(by_gram, center, gram, sums, 36, cfg)
    h_direct = train_direct(by_direct, center, lambda idx: features[np.sort(idx)], len(features), cfg)
    assert (by_gram.weight - start).abs().max() > 1e-2
    torch.testing.assert_close(by_gram.weight, by_direct.weight, rtol=0, atol=1e-10)
    if bias:
        torch.testing.assert_close(by_gram.bias, by_direct.bias, rtol=0, atol=1e-10)
    np.testing.assert_allclose(h_gram.loss, h_direct.loss, rtol=1e-10)
    assert h_gram.steps == h_direct.steps == 6 * 3
    assert h_gram.weight_norm == pytest.approx(h_direct.weight_norm, rel=1e-10)


def test_gram_matches_direct_float32_within_tolerance() -> None:
    features = _features(seed=3)
    gram, sums = gram_and_sums(features)
    cfg = TrainConfig(epochs=3, batch_size=4)
    center = make_center("uniform", 1.0, features.shape[1])
    a, b = Projector(12, dtype=torch.float64), Projector(12, dtype=torch.float32)
    train_gram(a, center, gram, sums, 36, cfg)
    train_direct(b, center, lambda idx: features[np.sort(idx)], len(features), cfg)
    torch.testing.assert_close(a.weight.float(), b.weight, rtol=1e-4, atol=1e-5)


def test_projector_kinds_agree() -> None:
    conv, linear = Projector(5, "conv1x1", seed=3), Projector(5, "linear", seed=3)
    x = torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(conv(x), linear(x))
    assert not torch.equal(conv.weight, Projector(5, "conv1x1", seed=4).weight)


@pytest.mark.parametrize("fused", [False, True])
def test_adam_equals_torch_adam(fused: bool) -> None:
    """Bit-identical to torch.optim.Adam with the same kernel (single-tensor or fused)."""
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(7, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = Adam([p1], lr=1e-2, weight_decay=5e-4, fused=fused)
    reference = torch.optim.Adam([p2], lr=1e-2, weight_decay=5e-4, foreach=False, fused=fused)
    for _ in range(20):
        grad = torch.randn(7, 3)
        p1.grad, p2.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_fused_adam_differs_from_single_tensor_by_rounding_only() -> None:
    torch.manual_seed(0)
    start = torch.randn(64, 64, dtype=torch.float64)
    fused, single = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    a, b = Adam([fused], lr=1e-2, weight_decay=5e-4), Adam([single], lr=1e-2, weight_decay=5e-4, fused=False)
    assert a.fused and not b.fused
    for _ in range(50):
        grad = torch.randn(64, 64, dtype=torch.float64)
        fused.grad, single.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    assert not torch.equal(fused, start)
    torch.testing.assert_close(fused, single, rtol=1e-13, atol=1e-15)


def test_schedule_is_seeded_and_complete() -> None:
    a = list(epoch_batches(10, 4, 3, seed=1))
    b = list(epoch_batches(10, 4, 3, seed=1))
    assert [[x.tolist() for x in e] for e in a] == [[x.tolist() for x in e] for e in b]
    for epoch in a:
        assert [len(x) for x in epoch] == [4, 4, 2]
        assert sorted(np.concatenate(epoch).tolist()) == list(range(10))
    assert a[0][0].tolist() != a[1][0].tolist() or a[0][1].tolist() != a[1][1].tolist()


def test_hinge_is_zero_inside_radius() -> None:
    center = torch.ones(3, dtype=torch.float64)
    z = center.view(1, 3, 1, 1).expand(1, 3, 2, 2).clone()
    assert float(hinge_loss(z, center, 1e-5)) == 0.0
    assert float(hinge_loss(z + 1, center, 1e-5)) == pytest.approx(3 - 1e-10)


def _collapsed(channels: int, center: torch.Tensor) -> Projector:
    projector = Projector(channels, dtype=torch.float64)
    with torch.no_grad():
        projector.weight.zero_()
        projector.bias.copy_(center)
    return projector


def test_gram_detects_batch_inside_radius() -> None:
    features = _features()
    gram, sums = gram_and_sums(features)
    center = make_center("normal", 1.0, 12)
    with pytest.raises(ShortcutInvalid, match=r"within"):
        train_gram(_collapsed(12, center), center, gram, sums, 36, TrainConfig(epochs=1, batch_size=4))


def test_certificate_finds_pixel_inside_radius_and_bounds_others() -> None:
    features = _features(n=4)
    gram, sums = gram_and_sums(features)
    center = make_center("normal", 1.0, 12)
    trained = Projector(12, dtype=torch.float64)
    collapsed = _collapsed(12, center)
    bounds = certified_min_distance_sq([trained, collapsed], [center, center], lambda: iter([features]),
                                       gram.sum(0), sums.sum(0), 4 * 36, radius=1e-5)
    with torch.no_grad():
        z = trained(torch.as_tensor(features, dtype=torch.float64))
        exact = float((z - center.view(1, -1, 1, 1)).pow(2).sum(1).min())
    assert 1e-10 < bounds[0] <= exact + 1e-12
    assert bounds[1] == pytest.approx(0.0, abs=1e-20)


@pytest.mark.parametrize("bias", [True, False])
def test_gram_matches_direct_batch_one_single_pass(bias: bool) -> None:
    """Protocol C: one image's statistics per step, one pass in a seeded order."""
    features = _features(n=9, seed=5)
    gram, sums = gram_and_sums(features)
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-2, seed=77)
    center = make_center("normal", 1.0, features.shape[1])
    by_gram = Projector(12, "conv1x1", bias, dtype=torch.float64)
    by_direct = Projector(12, "conv1x1", bias, dtype=torch.float64)
    seen_gram, seen_direct = [], []
    h_gram = train_gram(by_gram, center, gram, sums, 36, cfg, on_step=seen_gram.append)
    train_direct(by_direct, center, lambda idx: features[np.sort(idx)], len(features), cfg,
                 on_step=seen_direct.append)
    assert seen_gram == seen_direct == list(range(1, 10)) and h_gram.steps == 9
    torch.testing.assert_close(by_gram.weight, by_direct.weight, rtol=0, atol=1e-10)
    if bias:
        torch.testing.assert_close(by_gram.bias, by_direct.bias, rtol=0, atol=1e-10)


@pytest.mark.parametrize("trainer", ["gram", "direct"])
def test_evaluating_at_checkpoints_leaves_the_trajectory_unchanged(trainer: str) -> None:
    features = _features(n=8, seed=9)
    gram, sums = gram_and_sums(features)
    cfg = TrainConfig(epochs=1, batch_size=1, lr=1e-2)
    center = make_center("normal", 1.0, features.shape[1])
    evaluated = []

    def evaluate(projector: Projector):
        def on_step(seen: int) -> None:  # what the learning curve does: score the current model
            with torch.no_grad():
                evaluated.append(hinge_loss(projector(torch.as_tensor(features, dtype=torch.float64)), center, 0.0))
        return on_step

    def train(projector: Projector, on_step=None) -> None:
        if trainer == "gram":
            train_gram(projector, center, gram, sums, 36, cfg, on_step=on_step)
        else:
            train_direct(projector, center, lambda idx: features[np.sort(idx)], len(features), cfg, on_step=on_step)

    plain, observed = Projector(12, dtype=torch.float64), Projector(12, dtype=torch.float64)
    train(plain)
    train(observed, evaluate(observed))
    assert len(evaluated) == 8 and evaluated[-1] < evaluated[0]  # the callback saw the model improve
    assert torch.equal(plain.weight, observed.weight) and torch.equal(plain.bias, observed.bias)


def test_adam_state_round_trip_continues_identically() -> None:
    torch.manual_seed(0)
    target = torch.randn(4, 4, dtype=torch.float64)

    def steps(p: torch.nn.Parameter, optimizer: Adam, n: int) -> None:
        for _ in range(n):
            p.grad = 2 * (p.detach() - target)
            optimizer.step()

    a = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    opt_a = Adam([a], lr=0.1, weight_decay=1e-3)
    steps(a, opt_a, 6)
    b = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    opt_b = Adam([b], lr=0.1, weight_decay=1e-3)
    steps(b, opt_b, 3)
    c = torch.nn.Parameter(b.detach().clone())
    opt_c = Adam([c], lr=0.1, weight_decay=1e-3)
    opt_c.load_state_dict(opt_b.state_dict())
    steps(c, opt_c, 3)
    assert torch.equal(a, c)
