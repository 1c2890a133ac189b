"""No import climbs a layer: each part of polarocc imports only from the rows below it (DESIGN's architecture), and
no DVC stage module imports another stage's module (what two stages share lives in a lower row)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

# Bottom to top. A module may import its own part and any part of a lower row.
ROWS: list[tuple[str, ...]] = [
    ("__init__", "errors", "atomic", "device", "geometry", "memory", "ownership", "safe_load", "sampling"),
    ("config",),
    ("layout",),
    ("data",),
    ("models",),
    ("features",),
    ("scoring",),
    ("training",),
    ("peers",),
    ("analysis",),
    ("planning",),
    ("detector",),
    ("timing",),
    ("deploy",),
    ("reports",),
    ("pipeline",),
    ("cli",),
]
RANK = {part: row for row, parts in enumerate(ROWS) for part in parts}


def _part(module: str) -> str:
    """The architectural part of a polarocc module: its subpackage or top-level module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file() or base.is_dir()


def imports(path: Path) -> set[str]:
    """The polarocc modules ``path`` imports, at any depth (lazy imports inside functions too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "polarocc":
            # `from polarocc.pipeline import train` imports the module polarocc.pipeline.train; a name that is not
            # a module (a function, a class) counts as its module's import
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if _is_module(name) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "polarocc"}
    return found


def violations(root: Path) -> list[str]:
    """Every import of a higher row, or of another stage's module, under ``root`` (a polarocc package)."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path)
        if module == "polarocc":  # the package's public face re-exports the top objects (lazily): above all rows
            continue
        own = _part(module)
        for target in sorted(imports(path)):
            other = _part(target)
            if other not in RANK:  # e.g. `from polarocc import __version__`
                continue
            if own not in RANK:
                problems.append(f"{module}: its part {own!r} has no row in tests/test_layers.py")
            elif RANK[other] > RANK[own]:
                problems.append(f"{module} imports {target} (row {RANK[other]} above its row {RANK[own]})")
            elif own == other == "pipeline" and target not in ("polarocc.pipeline", module):
                problems.append(f"stage module {module} imports stage module {target}")
    return problems


def test_no_import_climbs_a_layer() -> None:
    assert violations(ROOT / "polarocc") == []


def test_every_part_has_a_row() -> None:
    parts = {_part(_module_name(p)) for p in (ROOT / "polarocc").rglob("*.py")}
    assert parts <= set(RANK), sorted(parts - set(RANK))


def test_the_check_finds_a_climb_and_a_stage_import(tmp_path: Path, monkeypatch) -> None:
    package = tmp_path / "polarocc"
    (package / "models").mkdir(parents=True)
    (package / "pipeline").mkdir()
    (package / "models" / "bad.py").write_text("def f():\n    from polarocc.deploy import predict\n")
    (package / "pipeline" / "score.py").write_text("from polarocc.pipeline.train import fit\n")
    (package / "pipeline" / "export.py").write_text("from polarocc.pipeline import score\n")
    (package / "deploy").mkdir()
    (package / "deploy" / "predict.py").write_text("")
    (package / "pipeline" / "train.py").write_text("from polarocc import layout\n")
    monkeypatch.setattr("tests.test_layers.ROOT", tmp_path)
    assert violations(package) == [
        "polarocc.models.bad imports polarocc.deploy.predict (row 13 above its row 4)",
        "stage module polarocc.pipeline.export imports stage module polarocc.pipeline.score",
        "stage module polarocc.pipeline.score imports stage module polarocc.pipeline.train",
    ]
