"""Exact sufficient-statistics trainer.

For z = W f + b and the loss mean_p ||z_p - c||^2 - R^2 (the hinge max(., 0) is inactive while no pixel
lies within R of c), a batch's loss and gradient depend on the features only through
G = sum_p f_p f_p^T, s = sum_p f_p and the pixel count n:

    L = (tr(W G W^T) + 2 (b - c)^T W s + n ||b - c||^2) / n - R^2
    dL/dW = 2/n (W G + (b - c) s^T),   dL/db = 2/n (W s + n (b - c))

With per-image G and s cached at extraction, a step costs one C x C x C product whatever the image
count or resolution, and the same Adam optimizer sees the same gradients as minibatch training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polarocc.config import TrainConfig
from polarocc.models.projector import Projector
from polarocc.training.optim import Adam
from polarocc.training.schedule import TrainHistory, epoch_batches


class ShortcutInvalid(RuntimeError):
    """Raised when a pixel may lie within the radius, where the hinge makes the loss non-quadratic."""


def _batch_sum(stats, batch: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Sum of the rows ``batch`` of ``stats``: a tensor in memory, or an array on disk (zarr) read one batch
    at a time. Rows are added in batch order either way, so both give the same bits."""
    if isinstance(stats, torch.Tensor):
        rows = {int(i): stats[int(i)] for i in batch}
    else:
        order = np.sort(batch)
        block = torch.as_tensor(np.asarray(stats.oindex[order]), dtype=dtype)
        rows = {int(i): block[k] for k, i in enumerate(order)}
    # Accumulate in place: stacking the batch's C x C matrices first would copy them.
    total = rows[int(batch[0])].clone()
    for i in batch[1:]:
        total += rows[int(i)]
    return total


def train_gram(projector: Projector, center: torch.Tensor, gram: np.ndarray, sums: np.ndarray,
               pixels_per_image: int, cfg: TrainConfig,
               on_step: Callable[[int], None] | None = None) -> TrainHistory:
    """Train ``projector`` in place from per-image Gram matrices (N, C, C) and feature sums (N, C).

    ``gram`` may be a zarr array: it is then read one batch at a time, so memory holds a batch of Gram
    matrices instead of all of them.

    ``on_step(images_seen)`` runs after every optimizer step (learning curves); it must not modify the
    projector.
    """
    dtype = projector.weight.dtype
    c = center.to(dtype)
    gram_t = torch.as_tensor(gram, dtype=dtype) if isinstance(gram, np.ndarray) else gram
    sums_t = torch.as_tensor(np.asarray(sums), dtype=dtype)
    optimizer = Adam(projector.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    history = TrainHistory("gram")
    radius_sq = cfg.radius ** 2
    W, b = projector.weight, projector.bias
    seen = 0
    for epoch, batches in enumerate(epoch_batches(len(sums_t), cfg.batch_size, cfg.epochs, cfg.seed), start=1):
        epoch_loss = 0.0
        for batch in batches:
            G, s = _batch_sum(gram_t, batch, dtype), _batch_sum(sums_t, batch, dtype)
            n = len(batch) * pixels_per_image
            with torch.no_grad():
                gap = -c if b is None else b - c
                WG, Ws = W @ G, W @ s
                mean_sq = (torch.vdot(WG.flatten(), W.flatten()) + 2 * gap @ Ws + n * gap @ gap) / n
                if mean_sq <= radius_sq:
                    raise ShortcutInvalid(
                        f"epoch {epoch}: the batch's mean squared distance {float(mean_sq):.3g} is within "
                        f"R^2 = {radius_sq:.3g}, so some pixel lies inside the radius"
                    )
                W.grad = 2.0 / n * (WG + torch.outer(gap, s))
                if b is not None:
                    b.grad = 2.0 / n * (Ws + n * gap)
            optimizer.step()
            history.steps += 1
            epoch_loss += float(mean_sq) - radius_sq
            seen += len(batch)
            if on_step is not None:
                on_step(seen)
        history.log_epoch(epoch_loss / len(batches), W, b, c)
    return history
