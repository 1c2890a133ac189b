"""Whole-file writes: a crash, or another process writing the same file, never leaves half a file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def torch_save_atomic(payload: Any, path: Path | str, temporary: Path | None = None) -> Path:
    """``torch.save`` to ``temporary`` (default ``<path>.partial``), then rename it into place.

    torch.save names the records inside its zip archive after the file it writes, so the temporary's name
    is part of the file's bytes: keep it fixed where outputs must be byte-identical across runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary or path.with_name(f"{path.name}.partial")
    torch.save(payload, partial)
    os.replace(partial, path)
    return path
