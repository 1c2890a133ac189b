"""Centers: norm, direction per distribution, seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from polarocc.errors import ConfigError
from polarocc.models.centers import make_center


@pytest.mark.parametrize("distribution", ["normal", "uniform", "ones"])
@pytest.mark.parametrize("norm", [0.5, 1, 64])
def test_norm_is_exact(distribution: str, norm: float) -> None:
    c = make_center(distribution, norm, 176)
    assert c.dtype == torch.float64 and c.shape == (176,)
    assert float(torch.linalg.vector_norm(c)) == pytest.approx(norm, rel=1e-12)


def test_directions() -> None:
    ones = make_center("ones", 2.0, 4)
    assert torch.allclose(ones, torch.full((4,), 1.0, dtype=torch.float64))
    uniform = make_center("uniform", 1.0, 1000)
    assert (uniform >= 0).all()  # U(0,1) directions live in the positive orthant
    normal = make_center("normal", 1.0, 1000)
    assert (normal < 0).any() and (normal > 0).any()
    mean = np.arange(1.0, 5.0)
    fm = make_center("feature_mean", 3.0, 4, feature_mean=mean)
    assert torch.allclose(fm, torch.as_tensor(mean / np.linalg.norm(mean) * 3.0))


def test_seed_controls_random_centers() -> None:
    a, b = make_center("normal", 1, 64, seed=1024), make_center("normal", 1, 64, seed=1024)
    assert torch.equal(a, b)
    assert not torch.equal(a, make_center("normal", 1, 64, seed=1025))
    assert torch.equal(make_center("ones", 1, 64, seed=1), make_center("ones", 1, 64, seed=2))


@pytest.mark.parametrize(("distribution", "norm", "match"), [
    ("normal", -1, "positive"), ("normal", float("nan"), "positive"), ("cauchy", 1, "cauchy"),
    ("feature_mean", 1, "mean pre-trained feature"),
])
def test_invalid(distribution: str, norm: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_center(distribution, norm, 8)


def test_zero_feature_mean_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"normalise"):
        make_center("feature_mean", 1, 3, feature_mean=np.zeros(3))
