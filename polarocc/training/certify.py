"""Certify that no training pixel lies within R of the center, the condition for the Gram shortcut.

For any matrix Q with orthonormal columns, ||x|| >= ||Q^T x||. With x = W f + g (g = b - c) and Q spanning
the mean offset and the top principal directions of z, ||Q^T W f + Q^T g||^2 is a cheap lower bound of
||z - c||^2 (k x C work per pixel instead of C x C) that is tight where z varies. Pixels whose bound is
not above R^2 get the exact distance, so the check is exact while costing a fraction of a forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from polarocc.memory import release_free_memory
from polarocc.models.projector import Projector


def _basis(weight: torch.Tensor, gap: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, n: int,
           rank: int) -> torch.Tensor:
    mean = total / n
    offset = weight @ mean + gap
    cov = weight @ (gram / n - torch.outer(mean, mean)) @ weight.T
    _, vecs = torch.linalg.eigh((cov + cov.T) / 2)
    directions = torch.cat([offset[:, None], vecs[:, -(rank - 1):]], dim=1)
    q, _ = torch.linalg.qr(directions)
    return q


@torch.no_grad()
def certified_min_distance_sq(projectors: list[Projector], centers: list[torch.Tensor],
                              batches: Callable[[], Iterable[np.ndarray]], gram: np.ndarray, sums: np.ndarray,
                              pixels: int, radius: float, rank: int = 8, device: str = "cpu") -> list[float]:
    """Per (projector, center): a lower bound of min ||z - c||^2 over all training pixels, exact where <= R^2.

    ``gram`` and ``sums`` are the summed training statistics (C x C and C); ``pixels`` their pixel count.
    A returned value <= R^2 is the exact distance of a pixel inside the radius. The products run on ``device``.
    """
    g_total = torch.as_tensor(gram, dtype=torch.float64).to(device)
    s_total = torch.as_tensor(sums, dtype=torch.float64).to(device)
    setup = []
    for projector, center in zip(projectors, centers, strict=True):
        weight = projector.weight.detach().to(device, torch.float64)
        center = center.to(device, torch.float64)
        gap = -center if projector.bias is None else projector.bias.detach().to(device, torch.float64) - center
        q = _basis(weight, gap, g_total, s_total, pixels, min(rank, weight.shape[0]))
        setup.append((weight, gap, q.T @ weight, q.T @ gap))
    bound = [float("inf")] * len(setup)
    radius_sq = radius ** 2
    f = None
    for features in batches():
        shard = torch.as_tensor(features).to(device)
        for image in shard:  # one image in float64 at a time: a 1792-channel shard would be 720 MB
            f = image.to(torch.float64).flatten(1)  # (C, pixels)
            for i, (weight, gap, reduced, reduced_gap) in enumerate(setup):
                low = (reduced @ f + reduced_gap[:, None]).pow(2).sum(0)
                unsure = low <= radius_sq
                if unsure.any():
                    exact = (weight @ f[:, unsure] + gap[:, None]).pow(2).sum(0)
                    low[unsure] = exact
                bound[i] = min(bound[i], float(low.min()))
        shard = f = None  # freed before the heap is trimmed
        release_free_memory()
    return bound
