"""Which torch device a step runs on."""

from __future__ import annotations

import torch

from polarocc.errors import ConfigError


def pick_device(requested: str, key: str = "device") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a CUDA device is an error naming ``key``."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    if requested not in ("cpu", "cuda"):
        raise ConfigError(f"{key}: unknown device {requested!r}; use auto, cpu or cuda")
    return requested
