"""Where the benchmarks write their results: ``reports/<name>.json`` and a markdown table beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def write_results(name: str, result: dict, to_markdown: Callable[[dict], str]) -> None:
    """Write ``reports/<name>.json`` and ``reports/<name>.md``, and print the table."""
    (REPORTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (REPORTS / f"{name}.md").write_text(to_markdown(result))
    print(to_markdown(result))
