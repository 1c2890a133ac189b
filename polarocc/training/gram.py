"""Exact sufficient-statistics trainer, every variant of a stage in lockstep.

For z = W f + b and the loss mean_p ||z_p - c||^2 - R^2 (the hinge max(., 0) is inactive while no pixel
lies within R of c), a batch's loss and gradient depend on the features only through
G = sum_p f_p f_p^T, s = sum_p f_p and the pixel count n:

    L = (tr(W G W^T) + 2 (b - c)^T W s + n ||b - c||^2) / n - R^2
    dL/dW = 2/n (W G + (b - c) s^T),   dL/db = 2/n (W s + n (b - c))

Variants that share the batches (every center of a category: same seed, same images) share G and s. Their
weights are held as one V x C x C stack with one Adam state per variant (Adam is elementwise, so the
stacked update is each variant's own), and a step is a handful of batched products instead of V times
as many small ops: on a loaded CPU, small ops pay thread synchronisation each.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from polarocc.config import TrainConfig
from polarocc.models.projector import Projector
from polarocc.training.optim import Adam
from polarocc.training.schedule import TrainHistory, epoch_batches
from polarocc.training.statistics import BatchStatistics, StoredStatistics


class ShortcutInvalid(RuntimeError):
    """Raised when a pixel may lie within the radius, where the hinge makes the loss non-quadratic."""


class VariantDiverged(FloatingPointError):
    """A variant's loss became NaN or Inf; ``index`` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def train_lockstep(projectors: list[Projector], centers: list[torch.Tensor], stats: BatchStatistics,
                   n_images: int, cfg: TrainConfig, on_step: Callable[[int, int], None] | None = None,
                   device: str = "cpu") -> tuple[list[TrainHistory], list[str | None]]:
    """Train ``projectors`` (same shape and kind, one per center) in place on the same batches.

    Returns each variant's history and, per variant, None or why the statistics shortcut did not apply
    (some batch's mean squared distance fell within R^2; that variant's weights must not be used).
    ``on_step(variant, images_seen)`` runs after every step for every variant; while it runs each projector
    holds that step's weights. A variant whose loss becomes NaN or Inf raises :class:`VariantDiverged`.
    """
    dtype = projectors[0].weight.dtype
    weight = nn.Parameter(torch.stack([p.weight.detach() for p in projectors]).to(device))
    has_bias = projectors[0].bias is not None
    bias = nn.Parameter(torch.stack([p.bias.detach() for p in projectors]).to(device)) if has_bias else None
    center = torch.stack([c.to(dtype) for c in centers]).to(device)
    for v, projector in enumerate(projectors):  # the projectors show the stack's live weights during training
        projector.weight.data = weight.data[v]
        if has_bias:
            projector.bias.data = bias.data[v]
    optimizer = Adam([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    histories = [TrainHistory("gram") for _ in projectors]
    invalid: list[str | None] = [None] * len(projectors)
    radius_sq = cfg.radius ** 2
    seen = 0
    try:
        for epoch, batches in enumerate(epoch_batches(n_images, cfg.batch_size, cfg.epochs, cfg.seed), start=1):
            stats.plan(batches)
            total = torch.zeros(len(projectors), dtype=dtype, device=device)
            closest = torch.full_like(total, float("inf"))
            for batch in batches:
                gram, sums, n = stats.batch(batch)
                with torch.no_grad():
                    gap = bias - center if has_bias else -center  # (V, C)
                    wg = torch.matmul(weight, gram)  # (V, C, C)
                    ws = torch.matmul(weight, sums)  # (V, C)
                    mean_sq = ((wg * weight).sum((1, 2)) + 2 * (gap * ws).sum(1) + n * (gap * gap).sum(1)) / n
                    wg += gap[:, :, None] * sums
                    weight.grad = wg.mul_(2.0 / n)
                    if has_bias:
                        bias.grad = (ws + n * gap).mul_(2.0 / n)
                optimizer.step()
                # Kept on the device: one synchronisation per epoch, not per step.
                total += mean_sq
                torch.minimum(closest, mean_sq, out=closest)
                seen += len(batch)
                if on_step is not None:
                    for v in range(len(projectors)):
                        on_step(v, seen)
            losses = (total / len(batches) - radius_sq).tolist()
            for v, (history, nearest) in enumerate(zip(histories, closest.tolist(), strict=True)):
                history.steps += len(batches)
                if invalid[v] is not None:
                    continue
                if nearest <= radius_sq:
                    invalid[v] = (f"epoch {epoch}: a batch's mean squared distance {nearest:.3g} is within "
                                  f"R^2 = {radius_sq:.3g}, so some pixel lies inside the radius")
                    continue
                try:
                    history.log_epoch(losses[v], weight[v], bias[v] if has_bias else None, center[v])
                except FloatingPointError as exc:
                    raise VariantDiverged(v, str(exc)) from exc
    finally:
        for v, projector in enumerate(projectors):  # own copies: a view would keep (and save) the whole stack
            projector.weight.data = weight.data[v].detach().cpu().clone()
            if has_bias:
                projector.bias.data = bias.data[v].detach().cpu().clone()
    return histories, invalid


def train_gram(projector: Projector, center: torch.Tensor, gram: np.ndarray, sums: np.ndarray,
               pixels_per_image: int, cfg: TrainConfig,
               on_step: Callable[[int], None] | None = None) -> TrainHistory:
    """Train one ``projector`` in place from per-image Gram matrices (N, C, C) and feature sums (N, C).

    ``gram`` may be a zarr array: it is then read one batch at a time. ``on_step(images_seen)`` runs after every
    optimizer step. Raises :class:`ShortcutInvalid` when a pixel may lie within the radius.
    """
    stats = StoredStatistics(gram, sums, pixels_per_image, projector.weight.dtype)
    [history], [problem] = train_lockstep([projector], [center], stats, len(sums), cfg,
                                          None if on_step is None else lambda _, seen: on_step(seen))
    if problem is not None:
        raise ShortcutInvalid(problem)
    return history
