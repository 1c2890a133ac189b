"""Peer detectors: the coreset, nearest-neighbour and Gaussian scores against straightforward versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, mahalanobis

from polarocc.peers import patchcore
from polarocc.peers.padim import PaDiM
from polarocc.peers.patchcore import PatchCore, greedy_coreset


def test_greedy_coreset_is_the_k_center_greedy_choice() -> None:
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.standard_normal((300, 8)).astype(np.float32))
    chosen = greedy_coreset(bank, 12, projection_dim=128, seed=5).numpy()  # no projection: 8 < 128
    assert len(set(chosen)) == 12
    points = bank.numpy().astype(np.float64)
    nearest = cdist(points, points[chosen[:1]]).min(1)
    for i in range(1, 12):  # each pick is the point farthest from the picks before it
        assert chosen[i] == int(np.argmax(nearest))
        nearest = np.minimum(nearest, cdist(points, points[chosen[i:i + 1]])[:, 0])
    again = greedy_coreset(bank, 12, seed=5).numpy()
    assert np.array_equal(chosen, again)
    assert len(greedy_coreset(bank, 400)) == 300


def test_patchcore_scores_are_distances_to_the_nearest_bank_vectors() -> None:
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.standard_normal((5, 6, 4, 4)).astype(np.float32))
    test = torch.from_numpy(rng.standard_normal((2, 6, 4, 4)).astype(np.float32))
    bank = train.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    queries = test.permute(0, 2, 3, 1).reshape(-1, 6).numpy()
    distances = np.sort(cdist(queries, bank), axis=1)
    for k in (1, 3):
        peer = PatchCore(k=k, thin=False).fit(train)
        expected = distances[:, :k].mean(1).reshape(2, 4, 4)
        np.testing.assert_allclose(peer.distance_maps(test, chunk=7).numpy(), expected, rtol=1e-5)
    thinned = PatchCore(coreset_ratio=0.1, projection_dim=4).fit(train)
    assert len(thinned.bank) == 8  # ceil(0.1 * 80)


@pytest.mark.parametrize("covariance", ["per_position", "shared"])
def test_padim_streaming_statistics_match_a_batch_computation(covariance: str) -> None:
    rng = np.random.default_rng(2)
    train = rng.standard_normal((40, 10, 3, 3))
    test = rng.standard_normal((3, 10, 3, 3))
    peer = PaDiM(channels=6, covariance=covariance, eps=0.01, seed=3)
    for start in range(0, 40, 7):  # uneven batches
        peer.partial_fit(torch.from_numpy(train[start:start + 7]))
    peer.finalize()
    index = peer.index.numpy()
    x = train[:, index].reshape(40, 6, 9).transpose(0, 2, 1)  # (N, positions, d)
    got = peer.distance_maps(torch.from_numpy(test)).numpy()
    y = test[:, index].reshape(3, 6, 9).transpose(0, 2, 1)
    for p in range(9):
        samples = x[:, p] if covariance == "per_position" else x.reshape(-1, 6)
        precision = np.linalg.inv(np.cov(samples, rowvar=False) + 0.01 * np.eye(6))
        for b in range(3):
            expected = mahalanobis(y[b, p], samples.mean(0), precision)
            assert got[b].reshape(-1)[p] == pytest.approx(expected, rel=1e-4)


def test_padim_needs_two_samples() -> None:
    peer = PaDiM(channels=None).partial_fit(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="two normal samples"):
        peer.finalize()


def test_reservoir_keeps_everything_below_its_limit_and_a_uniform_sample_above() -> None:
    from polarocc.sampling import Reservoir

    stream = torch.arange(100, dtype=torch.float32)[:, None]
    whole = Reservoir(1000)
    for start in range(0, 100, 7):
        whole.add(stream[start:start + 7])
    assert torch.equal(whole.rows, stream)

    counts = np.zeros(100)
    for seed in range(400):
        sample = Reservoir(10, seed)
        for start in range(0, 100, 13):
            sample.add(stream[start:start + 13])
        values = sample.rows[:, 0].long().numpy()
        assert len(values) == 10 and len(set(values)) == 10
        counts[values] += 1
    # Each row is kept with probability 10/100: 40 of 400 runs, within sampling noise.
    assert abs(counts[:10].mean() - 40) < 8 and abs(counts[90:].mean() - 40) < 8


def test_patchcore_bank_limit_bounds_the_bank() -> None:
    rng = np.random.default_rng(4)
    train = torch.from_numpy(rng.standard_normal((6, 5, 4, 4)).astype(np.float32))
    batches = [train[:2], train[2:5], train[5:]]
    assert torch.equal(PatchCore(thin=False).fit(iter(batches)).bank, PatchCore(thin=False).fit(train).bank)
    limited = PatchCore(thin=False, bank_limit=30, seed=1).fit(iter(batches))
    assert limited.bank.shape == (30, 5)
    every = train.permute(0, 2, 3, 1).reshape(-1, 5)
    assert all((every == row).all(1).any() for row in limited.bank)  # a sample of the real vectors


def _reference_coreset(bank: torch.Tensor, size: int, projection_dim: int, seed: int) -> np.ndarray:
    """The farthest-point rule written plainly (the code before the fused update), with the same random draws."""
    generator = torch.Generator().manual_seed(seed)
    points = bank.float()
    if projection_dim < bank.shape[1]:
        points = points @ (torch.randn(bank.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5)
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = ((points - points[chosen[0]]) ** 2).sum(1)
    for _ in range(1, size):
        chosen.append(int(torch.argmax(nearest)))
        nearest = torch.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(1))
    return np.array(chosen)


def test_fused_coreset_projects_and_picks_as_the_plain_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    # Clustered data (as patch features are), projected from 40 to 16 dimensions in blocks smaller than the bank.
    centers = rng.standard_normal((25, 40)) * 4
    bank = torch.from_numpy((centers[rng.integers(0, 25, 3000)] + rng.standard_normal((3000, 40))).astype(np.float32))
    monkeypatch.setattr(patchcore, "PROJECT_ROWS", 700)
    chosen = greedy_coreset(bank, 60, projection_dim=16, seed=11, progress="coreset").numpy()
    assert np.array_equal(chosen, _reference_coreset(bank, 60, 16, 11))
    # The first 25 picks find the 25 clusters (each pick is the farthest point: a new cluster while one is empty).
    assert len({int(np.argmin(((centers - bank[i].numpy()) ** 2).sum(1))) for i in chosen[:25]}) == 25


def test_patchcore_without_a_bank_limit_holds_every_vector() -> None:
    rng = np.random.default_rng(8)
    train = torch.from_numpy(rng.standard_normal((5, 6, 4, 4)).astype(np.float32))
    peer = PatchCore(coreset_ratio=0.5, bank_limit=None, device="cpu").fit(train)
    assert peer.bank.shape == (40, 6) and peer.bank.device.type == "cpu"  # half of 5 x 16 vectors
    test = torch.from_numpy(rng.standard_normal((2, 6, 4, 4)).astype(np.float32))
    expected = cdist(test.permute(0, 2, 3, 1).reshape(-1, 6).numpy(), peer.bank.numpy()).min(1).reshape(2, 4, 4)
    np.testing.assert_allclose(peer.distance_maps(test).numpy(), expected, rtol=1e-5, atol=1e-5)
