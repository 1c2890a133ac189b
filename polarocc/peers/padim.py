"""A PaDiM-style peer: a Gaussian of normal features per feature position (or one shared by all
positions), scored by the Mahalanobis distance. Statistics are accumulated batch by batch, so memory
depends on positions x channels^2, never on the image count."""

from __future__ import annotations

import torch

COVARIANCES = ("per_position", "shared")


class PaDiM:
    """``channels``: a seeded random subset of the feature channels (PaDiM's reduction; None keeps all).
    ``covariance``: ``per_position`` (PaDiM) or ``shared`` (one matrix for every position: the
    memory-aware option, positions x fewer). ``eps`` regularises each covariance (PaDiM: 0.01 I)."""

    def __init__(self, channels: int | None = 100, covariance: str = "per_position", eps: float = 0.01,
                 seed: int = 1024) -> None:
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {', '.join(COVARIANCES)}, got {covariance!r}")
        self.channels, self.covariance, self.eps, self.seed = channels, covariance, eps, seed
        self.index: torch.Tensor | None = None
        self.count = 0
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    def _select(self, features: torch.Tensor) -> torch.Tensor:
        # (B, C, h, w) -> (B, P, d) in float64
        x = features.double().flatten(2).transpose(1, 2)
        if self.index is None:
            total = x.shape[-1]
            keep = total if self.channels is None else min(self.channels, total)
            generator = torch.Generator().manual_seed(int(self.seed))
            self.index = torch.randperm(total, generator=generator)[:keep].sort().values
        return x[..., self.index]

    def partial_fit(self, features: torch.Tensor) -> PaDiM:
        """Add a batch of normal features (B, C, h, w) to the running sums."""
        x = self._select(features)
        if self.covariance == "shared":
            x = x.reshape(1, -1, x.shape[-1]).transpose(0, 1)  # every position is one more sample
        batch_sum = x.sum(0)
        batch_outer = torch.einsum("bpi,bpj->pij", x, x)
        self.sum = batch_sum if self.sum is None else self.sum + batch_sum
        self.outer = batch_outer if self.outer is None else self.outer + batch_outer
        self.count += x.shape[0]
        return self

    def finalize(self) -> PaDiM:
        """Means and inverse covariances from the running sums."""
        if self.count < 2:
            raise ValueError("PaDiM needs at least two normal samples")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.einsum("pi,pj->pij", mean, mean)) / (self.count - 1)
        cov = cov + self.eps * torch.eye(cov.shape[-1], dtype=cov.dtype)
        self.mean, self.precision = mean, torch.cholesky_inverse(torch.linalg.cholesky(cov))
        self.sum = self.outer = None
        return self

    @torch.no_grad()
    def distance_maps(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, h, w) Mahalanobis distance."""
        if self.precision is None:
            raise RuntimeError("call partial_fit() and finalize() first")
        b, _, h, w = features.shape
        diff = self._select(features) - self.mean
        squared = torch.einsum("bpi,pij,bpj->bp", diff, self.precision, diff)
        return squared.clamp_min(0).sqrt().reshape(b, h, w).float()
