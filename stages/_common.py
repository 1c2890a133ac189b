"""Shared bits of the stage scripts: run a stage function, turning polarocc errors into clean exits."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from polarocc.errors import PolaroccError


def run_stage(fn: Callable[..., Any], *args: Any) -> Any:
    """Call ``fn``; a PolaroccError prints its message and exits 2 instead of a traceback."""
    try:
        return fn(*args)
    except PolaroccError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
