"""Whole-file writes: a crash, or another process writing the same file, never leaves half a file.

Every output polarocc writes goes through these helpers: the content is written to a temporary file in the
target's folder and renamed over the target only once it is complete (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; outputs get the usual permissions (0o666 less the umask).
FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_file(path: Path | str, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.fchmod(fd, FILE_MODE)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: Path | str, payload: Any, indent: int | None = 1, sort_keys: bool = False,
               newline: bool = False) -> Path:
    """``json.dumps(payload)`` written atomically."""
    return write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + ("\n" if newline else ""))


def write_csv(path: Path | str, table: Any) -> Path:
    """A polars DataFrame as CSV, written atomically."""
    with atomic_file(path) as fh:
        table.write_csv(fh)
    return Path(path)


def save_figure(path: Path | str, figure: Any, **kwargs: Any) -> Path:
    """A matplotlib figure as PNG, written atomically."""
    with atomic_file(path) as fh:
        figure.savefig(fh, format="png", **kwargs)
    return Path(path)


def save_image(path: Path | str, image: Any) -> Path:
    """A PIL image as PNG, written atomically."""
    with atomic_file(path) as fh:
        image.save(fh, format="PNG")
    return Path(path)


def save_npy(path: Path | str, array: Any) -> Path:
    """A numpy array as ``.npy`` (no pickled objects), written atomically."""
    import numpy as np

    with atomic_file(path) as fh:
        np.save(fh, np.asarray(array), allow_pickle=False)
    return Path(path)


def torch_save_atomic(payload: Any, path: Path | str, temporary: Path | None = None) -> Path:
    """``torch.save`` to ``temporary`` (default ``<path>.partial``), then rename it into place.

    torch.save names the records inside its zip archive after the file it writes, so the temporary's name
    is part of the file's bytes: keep it fixed where outputs must be byte-identical across runs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary or path.with_name(f"{path.name}.partial")
    try:
        import torch  # here: torch's import (~1.5 s) would cost every stage that writes only tables

        torch.save(payload, partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    return path
