"""A PatchCore-style peer: a memory bank of normal patch features, thinned by a greedy coreset, scored by
the distance to the nearest bank entries. It reads the same cached features as the projector."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from polarocc.sampling import Reservoir


def greedy_coreset(bank: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 1024) -> torch.Tensor:
    """Indices of ``size`` rows of ``bank`` (N, C) chosen by greedy k-center selection.

    Distances are measured after a seeded random projection to ``projection_dim`` dimensions (as PatchCore
    does), written as ||x||^2 - 2 x.y + ||y||^2 so each step is one matrix-vector product.
    """
    n, channels = bank.shape
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(int(seed))
    points = bank.float()
    if projection_dim < channels:
        projection = torch.randn(channels, projection_dim, generator=generator) / math.sqrt(projection_dim)
        points = points @ projection
    squared = (points * points).sum(1)
    chosen = torch.empty(size, dtype=torch.int64)

    def distance_to(index: int) -> torch.Tensor:
        return (squared - 2 * (points @ points[index]) + squared[index]).clamp_min_(0)

    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = distance_to(int(chosen[0]))
    for i in range(1, size):
        chosen[i] = int(torch.argmax(nearest))
        torch.minimum(nearest, distance_to(int(chosen[i])), out=nearest)
    return chosen


class PatchCore:
    """Memory bank of (coreset-thinned) normal feature vectors; patch score = mean distance to the ``k``
    nearest bank vectors (k = 1 is PatchCore's patch score)."""

    def __init__(self, coreset_ratio: float = 0.01, k: int = 1, projection_dim: int = 128, seed: int = 1024,
                 thin: bool = True, bank_limit: int | None = None) -> None:
        self.coreset_ratio, self.k, self.projection_dim, self.seed, self.thin = (coreset_ratio, k, projection_dim,
                                                                                  seed, thin)
        self.bank_limit = bank_limit
        self.bank: torch.Tensor | None = None

    def fit(self, features: torch.Tensor | Iterable[torch.Tensor]) -> PatchCore:
        """Build the bank from normal features (N, C, h, w), a tensor or an iterable of batches.

        At most ``bank_limit`` vectors (a seeded uniform sample) are held before the coreset is chosen, so
        memory stays bounded however many images stream in; ``thin=False`` keeps the bank without a coreset.
        """
        batches = [features] if isinstance(features, torch.Tensor) else features
        reservoir = Reservoir(self.bank_limit or 2 ** 62, self.seed)
        for batch in batches:
            batch = torch.as_tensor(batch)
            reservoir.add(batch.float().permute(0, 2, 3, 1).reshape(-1, batch.shape[1]))
        if reservoir.rows is None:
            raise ValueError("PatchCore needs normal training features")
        bank = reservoir.rows
        if self.thin:
            size = max(1, math.ceil(self.coreset_ratio * len(bank)))
            bank = bank[greedy_coreset(bank, size, self.projection_dim, self.seed)]
        self.bank = bank.contiguous()
        return self

    @torch.no_grad()
    def distance_maps(self, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) distance to the bank."""
        if self.bank is None:
            raise RuntimeError("call fit() first")
        b, c, h, w = features.shape
        queries = features.float().permute(0, 2, 3, 1).reshape(-1, c)
        k = min(self.k, len(self.bank))
        out = torch.cat([torch.cdist(queries[i:i + chunk], self.bank).topk(k, largest=False).values.mean(1)
                         for i in range(0, len(queries), chunk)])
        return out.reshape(b, h, w)
