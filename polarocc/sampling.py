"""Seeded uniform sampling from streams, so memory stays bounded however much data streams in."""

from __future__ import annotations

import numpy as np
import torch


class Reservoir:
    """A uniform random sample of at most ``limit`` rows from a stream of row blocks (Algorithm R, seeded).

    While the stream holds no more than ``limit`` rows, the sample is every row in order.
    """

    def __init__(self, limit: int, seed: int = 1024) -> None:
        self.limit = limit
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rows: torch.Tensor | None = None
        self.seen = 0

    def add(self, block: torch.Tensor) -> None:
        """Offer the rows of ``block`` (M, C)."""
        if self.rows is None:
            self.rows = torch.empty((0, block.shape[1]), dtype=block.dtype)
        room = max(0, self.limit - len(self.rows))
        if room:
            self.rows = torch.cat([self.rows, block[:room]])
        rest = block[room:]
        if len(rest):
            # Row t (0-based in the stream) replaces slot j ~ U{0..t} when j < limit; later rows win, as in
            # the sequential algorithm.
            positions = torch.arange(self.seen + room, self.seen + room + len(rest), dtype=torch.float64)
            slots = (torch.rand(len(rest), generator=self.generator, dtype=torch.float64) * (positions + 1)).long()
            keep = slots < self.limit
            self.rows[slots[keep]] = rest[keep]
        self.seen += len(block)


def stratified_rows(groups: list[str], count: int, seed: int = 1024) -> np.ndarray:
    """Ascending indices of a seeded sample of about ``count`` items (all when ``count`` is 0 or covers them),
    drawn from every group in proportion to its size (rounded) and at least one from each, so a small sample still
    holds every defect type and the good images; with more groups than ``count`` it holds one of each."""
    n = len(groups)
    if count <= 0 or count >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    names = sorted(set(groups))
    members = {g: np.flatnonzero(np.asarray(groups) == g) for g in names}
    take = {g: max(1, round(count * len(members[g]) / n)) for g in names}
    return np.sort(np.concatenate([rng.choice(members[g], min(take[g], len(members[g])), replace=False)
                                   for g in names]))
