"""The per-image record every reader produces and every later stage consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

NORMAL_TYPE = "good"


@dataclass(frozen=True)
class Sample:
    """One image: where it is, whether it is anomalous, and where its pixel mask is."""

    path: Path
    label: int  # 0 normal, 1 anomalous
    defect_type: str = NORMAL_TYPE
    mask_path: Path | None = None

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (paths as strings)."""
        record = asdict(self)
        record["path"] = str(self.path)
        record["mask_path"] = None if self.mask_path is None else str(self.mask_path)
        return record

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Sample:
        """Inverse of :meth:`to_record`."""
        mask = record.get("mask_path")
        return cls(Path(record["path"]), int(record["label"]), record["defect_type"],
                   None if mask is None else Path(mask))
