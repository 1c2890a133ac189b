"""The minibatch order shared by every trainer, so that they follow the same trajectory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch


def epoch_batches(n_images: int, batch_size: int, epochs: int, seed: int) -> Iterator[list[np.ndarray]]:
    """Yield, per epoch, a shuffled split of ``range(n_images)`` into batches (last one may be short)."""
    if n_images <= 0:
        raise ValueError("cannot train on zero images")
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(epochs):
        order = torch.randperm(n_images, generator=generator).numpy()
        yield [order[i:i + batch_size] for i in range(0, n_images, batch_size)]


@dataclass
class TrainHistory:
    """Per-epoch record of a training run (final epoch is the reported model)."""

    trainer: str
    loss: list[float] = field(default_factory=list)
    weight_norm: list[float] = field(default_factory=list)
    bias_gap: list[float] = field(default_factory=list)
    steps: int = 0
    notes: list[str] = field(default_factory=list)

    def log_epoch(self, loss: float, weight: torch.Tensor, bias: torch.Tensor | None, center: torch.Tensor) -> None:
        """Record the epoch's mean loss and the distance from the collapse W = 0, b = c."""
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss} at epoch {len(self.loss) + 1}")
        self.loss.append(float(loss))
        self.weight_norm.append(float(torch.linalg.matrix_norm(weight.detach())))
        gap = center if bias is None else bias.detach() - center
        self.bias_gap.append(float(torch.linalg.vector_norm(gap)))

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"trainer": self.trainer, "steps": self.steps, "loss": self.loss, "weight_norm": self.weight_norm,
                "bias_gap": self.bias_gap, "notes": self.notes}
