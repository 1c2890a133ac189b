"""polarocc: data-agnostic deep one-class anomaly detection with a random hypersphere center.

``polarocc.Detector`` is the method as one object (see :mod:`polarocc.detector.detector`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Detector", "__version__"]

if TYPE_CHECKING:
    from polarocc.detector.detector import Detector


def __getattr__(name: str) -> Any:
    # Imported on first use: torch and timm cost seconds, which stages that never score (validate, report)
    # would otherwise pay just for importing polarocc.config.
    if name == "Detector":
        from polarocc.detector.detector import Detector

        return Detector
    raise AttributeError(f"module 'polarocc' has no attribute {name!r}")
