"""Reference trainer: minibatches over the cached feature maps, autograd through the hinge loss; a lockstep
form trains several centers on the same batches as one weight stack."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from polarocc.config import TrainConfig
from polarocc.models.projector import Projector
from polarocc.training.optim import Adam
from polarocc.training.schedule import TrainHistory, epoch_batches


class VariantLossDiverged(FloatingPointError):
    """A lockstep variant's loss became NaN or Inf; ``index`` says which."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


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


def _flat_positions(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * H * W, C), every position a row (a view for one position per image)."""
    if features.shape[-2:] == (1, 1):
        return features.flatten(1)
    return features.movedim(1, -1).reshape(-1, features.shape[1])


def lockstep_step(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, center: torch.Tensor,
                  radius_sq: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each variant's hinge loss on ``rows`` (P, C) and its gradients, for a V x C x C ``weight`` stack.

    z_v = F W_v^T + b_v, d = z_v - c_v, loss_v = mean_p max(||d_p||^2 - R^2, 0); with a_p = [||d_p||^2 > R^2]
    (where autograd's relu passes the gradient), dL/dz_p = (2 / P) a_p d_p, so dL/dW_v = sum_p dL/dz_p f_p^T
    and dL/db_v = sum_p dL/dz_p. The products of every variant are one matrix product each (V C x C
    stacked), the weight gradient comes out in the weight's own layout, and no autograd graph is kept.
    Returns (losses (V,), weight gradient (V, C, C), bias gradient (V, C) or None).
    """
    variants, channels = center.shape
    positions = rows.shape[0]
    z = torch.matmul(rows, weight.reshape(variants * channels, channels).T).view(positions, variants, channels)
    if bias is not None:
        z += bias
    d = z.sub_(center)  # (P, V, C)
    excess = d.square().sum(2).sub_(radius_sq)  # (P, V): ||z - c||^2 - R^2
    losses = torch.relu(excess).mean(0)
    scale = (excess > 0).to(d.dtype).mul_(2.0 / positions)  # (P, V)
    dz = d.mul_(scale[:, :, None])
    weight_grad = torch.matmul(dz.view(positions, variants * channels).T, rows).view(variants, channels, channels)
    return losses, weight_grad, None if bias is None else dz.sum(0)


def train_direct_lockstep(projectors: list[Projector], centers: list[torch.Tensor],
                          load_batch: Callable[[np.ndarray], np.ndarray], n_images: int, cfg: TrainConfig,
                          device: str = "cpu", on_step: Callable[[int, int], None] | None = None,
                          ) -> list[TrainHistory]:
    """Train ``projectors`` (same shape and dtype, one per center) in place on the same batches, as
    :func:`train_direct` trains each, in one pass over the data.

    The weights are one V x C x C stack (biases V x C) with one Adam over the stacks (Adam is elementwise, so
    each variant gets its own update); a step is one product z = F W_v^T + b_v for every variant and the
    hinge loss max(||z - c_v||^2 - R^2, 0) averaged over each variant's pixels, with its gradient written out
    (:func:`lockstep_step`: the same gradient autograd forms in :func:`train_direct`, up to rounding).
    ``load_batch(indices)`` returns features (B, C, H, W) (one position per image, (B, C, 1, 1), is the fast
    case). ``on_step(variant, images_seen)`` runs after every step for every variant; while it runs each
    projector holds that step's weights. Returns each variant's history; a variant whose loss becomes NaN or
    Inf raises :class:`VariantLossDiverged` (a FloatingPointError) naming it, the projectors then holding the
    weights of the failing epoch.
    """
    if len(projectors) != len(centers) or not projectors:
        raise ValueError(f"{len(projectors)} projectors for {len(centers)} centers")
    dtype = projectors[0].weight.dtype
    has_bias = projectors[0].bias is not None
    weight = torch.stack([p.weight.detach() for p in projectors]).to(device)
    bias = torch.stack([p.bias.detach() for p in projectors]).to(device) if has_bias else None
    center = torch.stack([c.to(dtype) for c in centers]).to(device)  # (V, C)
    for v, projector in enumerate(projectors):  # the projectors show the stack's live weights during training
        projector.weight.data = weight[v]
        if has_bias:
            projector.bias.data = bias[v]
    optimizer = Adam([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    histories = [TrainHistory("direct") for _ in projectors]
    radius_sq = cfg.radius ** 2
    seen = 0
    try:
        for batches in epoch_batches(n_images, cfg.batch_size, cfg.epochs, cfg.seed):
            total = torch.zeros(len(projectors), dtype=dtype, device=device)
            for batch in batches:
                rows = _flat_positions(torch.as_tensor(load_batch(batch)).to(device=device, dtype=dtype))
                with torch.no_grad():
                    losses, weight.grad, grad_bias = lockstep_step(rows, weight, bias, center, radius_sq)
                    if has_bias:
                        bias.grad = grad_bias
                optimizer.step()
                total += losses  # kept on the device: one synchronisation per epoch, not per step
                seen += len(batch)
                if on_step is not None:
                    for v in range(len(projectors)):
                        on_step(v, seen)
            for v, (history, loss) in enumerate(zip(histories, (total / len(batches)).tolist(), strict=True)):
                history.steps += len(batches)
                try:
                    history.log_epoch(loss, weight[v], bias[v] if has_bias else None, center[v])
                except FloatingPointError as exc:
                    raise VariantLossDiverged(v, f"variant {v}: {exc}") from exc
    finally:
        weight.grad = None
        if has_bias:
            bias.grad = None
        for v, projector in enumerate(projectors):  # own copies: a view would keep (and save) the whole stack
            projector.weight.data = weight[v].cpu().clone()
            if has_bias:
                projector.bias.data = bias[v].cpu().clone()
    return histories
