"""Whole-file writes: a crash, or another process writing the same file, never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def torch_save_atomic(payload: Any, path: Path | str) -> Path:
    """``torch.save`` to a process-unique temporary beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path
