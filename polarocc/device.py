"""Where a step runs: the torch device, and the dask scheduler extraction may use."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from polarocc.errors import ConfigError


def check_device(requested: str, key: str = "device") -> None:
    """Fail, naming ``key``, unless ``requested`` is auto, cpu, or cuda with a CUDA device; torch is imported
    only to check 'cuda' (its import costs the `validate` stage a second)."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key}: unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "cuda":
        pick_device(requested, key)


def pick_device(requested: str, key: str = "device") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without a CUDA device is an error naming ``key``."""
    if requested not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"{key}: unknown device {requested!r}; use auto, cpu or cuda")
    if requested == "cpu":
        return requested
    import torch  # here: see check_device

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: 'cuda' was requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    return requested


def check_scheduler(address: str, key: str = "extract.scheduler", timeout: float = 5.0) -> None:
    """For a ``tcp://host:port`` dask scheduler address, fail (naming ``key``) unless something listens there;
    ``inprocess``, ``local`` and other protocols are not checked."""
    if "://" not in address:
        return
    parts = urlsplit(address)
    if parts.scheme != "tcp":
        return
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ConfigError(f"{key}: {address!r} is not a scheduler address; write tcp://host:port (dask's port is "
                          "8786 by default)")
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: no dask scheduler answers at {address} ({exc.strerror or exc}); start it "
                          "(`dask scheduler`) or use local or inprocess") from exc
