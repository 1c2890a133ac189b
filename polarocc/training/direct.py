"""Reference trainer: minibatches over the cached feature maps, autograd through the hinge loss."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polarocc.config import TrainConfig
from polarocc.models.projector import Projector
from polarocc.training.optim import Adam
from polarocc.training.schedule import TrainHistory, epoch_batches


def hinge_loss(z: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """mean over pixels of max(||z - c||^2 - R^2, 0) for z of shape (N, C, H, W)."""
    dist_sq = (z - center.view(1, -1, 1, 1)).pow(2).sum(1)
    return torch.relu(dist_sq - radius ** 2).mean()


def train_direct(projector: Projector, center: torch.Tensor, load_batch: Callable[[np.ndarray], np.ndarray],
                 n_images: int, cfg: TrainConfig, device: str = "cpu",
                 on_step: Callable[[int], None] | None = None) -> TrainHistory:
    """Train ``projector`` in place; ``load_batch(indices)`` returns features (B, C, H, W).

    ``on_step(images_seen)`` runs after every optimizer step, as in :func:`~polarocc.training.gram.train_gram`.
    """
    dtype = projector.weight.dtype
    projector.to(device)
    c = center.to(device=device, dtype=dtype)
    optimizer = Adam(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory("direct")
    seen = 0
    for batches in epoch_batches(n_images, cfg.batch_size, cfg.epochs, cfg.seed):
        epoch_loss = 0.0
        for batch in batches:
            features = torch.as_tensor(load_batch(batch)).to(device=device, dtype=dtype)
            loss = hinge_loss(projector(features), c, cfg.radius)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.steps += 1
            epoch_loss += float(loss.detach())
            seen += len(batch)
            if on_step is not None:
                on_step(seen)
        history.log_epoch(epoch_loss / len(batches), projector.weight, projector.bias, c)
    projector.to("cpu")
    return history
