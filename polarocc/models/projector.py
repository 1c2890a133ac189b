"""The only trainable part: an affine map z = W f + b from C feature channels to C output channels."""

from __future__ import annotations

import math

import torch
from torch import nn

from polarocc.config import PROJECTORS
from polarocc.errors import ConfigError


class Projector(nn.Module):
    """Affine channel map as a 1x1 conv (``conv1x1``) or a channel-last linear layer (``linear``).

    Both kinds compute the same function and share the initialisation (PyTorch's default kaiming-uniform,
    drawn from a seeded generator), so they differ only in which op runs.
    """

    def __init__(self, channels: int, kind: str = "conv1x1", bias: bool = True, seed: int = 1024,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if kind not in PROJECTORS:
            raise ConfigError(f"unknown projector kind {kind!r}; choose one of {', '.join(PROJECTORS)}")
        self.kind = kind
        self.channels = channels
        generator = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(channels)  # nn.Conv2d/nn.Linear default: kaiming_uniform(a=sqrt(5))
        weight = (torch.rand(channels, channels, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        self.weight = nn.Parameter(weight.to(dtype))
        if bias:
            b = (torch.rand(channels, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            self.bias = nn.Parameter(b.to(dtype))
        else:
            self.register_parameter("bias", None)

    @property
    def has_bias(self) -> bool:
        """Whether the projector has a bias term (the collapse W = 0, b = c is then reachable)."""
        return self.bias is not None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if features.shape[-2:] == (1, 1):  # one position per image (Protocol A): a plain matrix product
            return nn.functional.linear(features.flatten(1), self.weight, self.bias)[:, :, None, None]
        if self.kind == "conv1x1":
            return nn.functional.conv2d(features, self.weight[:, :, None, None], self.bias)
        return nn.functional.linear(features.movedim(1, -1), self.weight, self.bias).movedim(-1, 1)

    def state(self) -> dict[str, torch.Tensor | str | None]:
        """Weights as plain tensors for saving."""
        return {"kind": self.kind, "weight": self.weight.detach().cpu(),
                "bias": None if self.bias is None else self.bias.detach().cpu()}

    @classmethod
    def from_state(cls, state: dict, dtype: torch.dtype = torch.float32) -> Projector:
        """Rebuild a projector saved by :meth:`state`."""
        weight = state["weight"]
        projector = cls(weight.shape[0], str(state["kind"]), state["bias"] is not None, dtype=dtype)
        with torch.no_grad():
            projector.weight.copy_(weight)
            if state["bias"] is not None:
                projector.bias.copy_(state["bias"])
        return projector
