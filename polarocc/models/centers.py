"""Data-agnostic hypersphere centers: a direction from a distribution, scaled to a chosen norm."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polarocc.config import DISTRIBUTIONS, validate_norm
from polarocc.errors import ConfigError


def make_center(distribution: str, norm: float, dim: int, seed: int = 1024,
                feature_mean: np.ndarray | torch.Tensor | Callable[[], np.ndarray] | None = None) -> torch.Tensor:
    """A float64 center of L2 norm ``norm`` in ``dim`` dimensions.

    ``normal`` and ``uniform`` draw N(0,1) / U(0,1) from a generator seeded with ``seed``; ``ones`` is the
    all-ones direction; ``feature_mean`` is the direction of the mean pre-trained feature (pass it, or a
    function computing it: it is called only for that distribution).
    """
    norm = validate_norm(norm)
    if distribution not in DISTRIBUTIONS:
        raise ConfigError(f"unknown center distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
    generator = torch.Generator().manual_seed(int(seed))
    if distribution == "normal":
        direction = torch.randn(dim, generator=generator, dtype=torch.float64)
    elif distribution == "uniform":
        direction = torch.rand(dim, generator=generator, dtype=torch.float64)
    elif distribution == "ones":
        direction = torch.ones(dim, dtype=torch.float64)
    else:
        if feature_mean is None:
            raise ConfigError("center distribution 'feature_mean' needs the mean pre-trained feature")
        mean = feature_mean() if callable(feature_mean) else feature_mean
        direction = torch.as_tensor(np.asarray(mean), dtype=torch.float64).flatten()
        if direction.numel() != dim:
            raise ConfigError(f"feature mean has {direction.numel()} channels but the projector outputs {dim}")
    length = torch.linalg.vector_norm(direction)
    if not torch.isfinite(length) or length == 0:
        raise ConfigError(f"cannot normalise a {distribution} center of length {float(length)}")
    return direction / length * norm
