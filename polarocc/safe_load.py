"""Reading files that could have been tampered with, without ever executing code from them.

Model, state and weights files are read with ``torch.load(weights_only=True)``: tensors, numbers, strings,
lists, tuples and dicts only. Python pickles from datasets (CIFAR) go through an unpickler that admits
only the few numpy constructors those files need.
"""

from __future__ import annotations

import io
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from polarocc.errors import PolaroccError


def _reason(exc: Exception) -> str:
    """What was wrong with the file, without torch's advice to retry with an unsafe load."""
    text = " ".join(str(exc).split())
    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in text:
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        return ("it refers to the Python object " + found.group(1) + ", which could run code" if found
                else "it is not a torch file of tensors and plain data (damaged, truncated or foreign)")
    if isinstance(exc, EOFError) or not text:
        return "the file is empty or truncated"
    return f"{type(exc).__name__}: {text[:200]}"


def torch_load_plain(path: Path | str, error: type[PolaroccError], what: str, fix: str) -> Any:
    """``torch.load`` of tensors and plain data only; any failure raises ``error`` naming ``path``, ``what`` it
    should have been and the ``fix``."""
    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch warns about legacy formats before refusing them: the error says it
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise error(f"{path} does not exist; {fix}") from exc
    except Exception as exc:  # torch raises many types for truncated, foreign or malicious files
        raise error(f"cannot read {path} as {what}: {_reason(exc)}; polarocc never runs code from files. {fix}") \
            from exc


# (module, name) pairs a CIFAR python batch needs: numpy arrays, their dtypes and scalars, and bytes.
_NUMPY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol-2 pickles spell bytes
})


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin containers, strings, numbers and numpy arrays; any other global
    (a function or class that could run code) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name}: only plain data and numpy "
                                     "arrays are allowed")


def load_plain_pickle(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` with :class:`PlainDataUnpickler` (``encoding`` as for ``pickle.load``, for Python 2
    pickles)."""
    return PlainDataUnpickler(io.BytesIO(data), encoding=encoding).load()
