"""A PatchCore-style peer: a memory bank of normal patch features, thinned by a greedy coreset, scored by
the distance to the nearest bank entries. It reads the same cached features as the projector."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from tqdm import tqdm

from polarocc.sampling import Reservoir

PROJECT_ROWS = 65_536  # rows projected at a time: the float32 copy of the bank is never made whole


def project_bank(bank: torch.Tensor, projection_dim: int, generator: torch.Generator,
                 device: str = "cpu") -> torch.Tensor:
    """``bank`` (N, C) in float32 after a Gaussian random projection (drawn from ``generator``) to
    ``projection_dim`` dimensions (unchanged when it has no more channels), on ``device``, a block of rows at a
    time."""
    n, channels = bank.shape
    if projection_dim >= channels:
        return bank.to(device=device, dtype=torch.float32)
    projection = (torch.randn(channels, projection_dim, generator=generator) / math.sqrt(projection_dim)).to(device)
    points = torch.empty(n, projection_dim, dtype=torch.float32, device=device)
    for i in range(0, n, PROJECT_ROWS):
        points[i:i + PROJECT_ROWS] = bank[i:i + PROJECT_ROWS].to(device=device, dtype=torch.float32) @ projection
    return points


def coreset_size(ratio: float, held: int) -> int:
    """Vectors the coreset keeps of ``held`` training vectors: the fraction ``ratio``, rounded up, at least one."""
    return max(1, math.ceil(ratio * held))


def greedy_coreset(bank: torch.Tensor, size: int, projection_dim: int = 128, seed: int = 1024, device: str = "cpu",
                   progress: str | None = None) -> torch.Tensor:
    """Indices of ``size`` rows of ``bank`` (N, C) chosen by greedy k-center selection (the farthest-point rule of
    PatchCore's coreset): each step takes the row farthest from every row chosen so far.

    Distances are measured after a seeded random projection to ``projection_dim`` dimensions (as PatchCore
    does), in float32 on ``device``. Each row keeps its squared distance to the nearest chosen row, and a step
    updates it with one fused matrix-vector product (||x||^2 - 2 x.c + ||c||^2): a step reads the projected bank
    once, so the selection costs ``size`` x N x ``projection_dim``. ``progress``: the label of a progress bar.
    """
    n = bank.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(int(seed))
    points = project_bank(bank, projection_dim, generator, device)
    squared = (points * points).sum(1)
    chosen = torch.empty(size, dtype=torch.int64)
    nearest = torch.full((n,), math.inf, dtype=torch.float32, device=points.device)
    distance = torch.empty_like(nearest)
    selected = int(torch.randint(n, (1,), generator=generator))
    for step in tqdm(range(size), desc=progress, unit="step", leave=False, disable=progress is None,
                     mininterval=1.0):
        chosen[step] = selected
        torch.addmv(squared, points, points[selected], alpha=-2, out=distance)
        distance.add_(squared[selected]).clamp_min_(0)
        torch.minimum(nearest, distance, out=nearest)
        selected = int(torch.argmax(nearest))
    return chosen


class PatchCore:
    """Memory bank of (coreset-thinned) normal feature vectors; patch score = mean distance to the ``k``
    nearest bank vectors (k = 1 is PatchCore's patch score)."""

    def __init__(self, coreset_ratio: float = 0.01, k: int = 1, projection_dim: int = 128, seed: int = 1024,
                 thin: bool = True, bank_limit: int | None = None, device: str = "cpu",
                 progress: str | None = None) -> None:
        self.coreset_ratio, self.k, self.projection_dim, self.seed, self.thin = (coreset_ratio, k, projection_dim,
                                                                                  seed, thin)
        self.bank_limit, self.device, self.progress = bank_limit, device, progress
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
            size = coreset_size(self.coreset_ratio, len(bank))
            bank = bank[greedy_coreset(bank, size, self.projection_dim, self.seed, self.device,
                                       None if self.progress is None else f"{self.progress} coreset")]
        self.bank = bank.contiguous().to(self.device)
        return self

    @torch.no_grad()
    def distance_maps(self, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) distance to the bank."""
        if self.bank is None:
            raise RuntimeError("call fit() first")
        b, c, h, w = features.shape
        queries = features.float().permute(0, 2, 3, 1).reshape(-1, c).to(self.bank.device)
        k = min(self.k, len(self.bank))
        out = torch.cat([torch.cdist(queries[i:i + chunk], self.bank).topk(k, largest=False).values.mean(1)
                         for i in range(0, len(queries), chunk)])
        return out.reshape(b, h, w).to(features.device)
