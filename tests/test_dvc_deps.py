"""dvc.yaml cannot go stale: every stage depends on all the code it runs, and on the validate stage."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

PARAMS_CHECK = "reports/params_check.json"


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _lazy_exports() -> dict[str, set[str]]:
    """The package's lazily exported names (``polarocc.Detector``): the modules each one imports in the package's
    ``__getattr__``, which runs only when a script asks for that name."""
    exports: dict[str, set[str]] = {}
    tree = ast.parse((ROOT / "polarocc" / "__init__.py").read_text())
    for function in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"):
        for node in ast.walk(function):
            if isinstance(node, ast.ImportFrom) and node.module:
                exports.update({f"polarocc.{a.name}": {node.module} for a in node.names})
    return exports


def _imported_names(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth of the file (lazy imports inside functions too); the
    package's own lazy exports count where a script imports the exported name, not in the package itself."""
    package = path.relative_to(ROOT).parent.parts
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    if path == ROOT / "polarocc" / "__init__.py":
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    # `if TYPE_CHECKING:` imports never run.
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                                              and n.test.id == "TYPE_CHECKING")]
    lazy = _lazy_exports()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                module = ".".join([*package[: len(package) - node.level + 1], *([module] if module else [])])
            names |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
    return names | {target for name in names for target in lazy.get(name, ())}


def import_closure(script: Path) -> set[str]:
    """Repository files (relative paths) a stage script runs: itself, ``stages/_common.py`` and every module of
    polarocc it imports, directly or through other modules (each parent package's ``__init__`` included)."""
    todo, seen = [script], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imported_names(path):
            if name == "_common":
                todo.append(ROOT / "stages" / "_common.py")
            elif name.split(".")[0] == "polarocc":
                parts = name.split(".")
                todo += [f for i in range(1, len(parts) + 1) if (f := _module_file(".".join(parts[:i])))]
    return {str(p.relative_to(ROOT)) for p in seen}


def _stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_stage_depends_on_the_code_it_imports(stage: str) -> None:
    spec = _stages()[stage]
    script = spec["cmd"].split()[1]
    assert script.startswith("stages/"), spec["cmd"]
    closure = import_closure(ROOT / script)
    assert len(closure) > 3  # the script, _common and at least one polarocc module
    missing = sorted(path for path in closure if not _covered(path, spec["deps"]))
    assert not missing, f"dvc.yaml stage {stage} lacks dependencies on {missing}"


def test_closure_follows_lazy_and_relative_imports(tmp_path: Path) -> None:
    closure = import_closure(ROOT / "stages" / "validate.py")
    assert {"stages/_common.py", "polarocc/__init__.py", "polarocc/config.py", "polarocc/pipeline/__init__.py",
            "polarocc/pipeline/validate.py", "polarocc/models/weights.py"} <= closure
    assert "polarocc/cli.py" not in closure


@pytest.mark.parametrize("stage", sorted(set(_stages()) - {"validate", "validate_backbone"}))
def test_every_stage_runs_after_validation(stage: str) -> None:
    assert PARAMS_CHECK in _stages()[stage]["deps"]


def test_backbone_validation_runs_first_and_only_for_backbone_params() -> None:
    stages = _stages()
    assert "reports/backbone_check.json" in stages["validate"]["deps"]
    assert stages["validate_backbone"]["params"] == ["backbone"]
    [out] = stages["validate_backbone"]["outs"]
    assert out == {"reports/backbone_check.json": {"cache": False, "persist": True}}


def test_validation_depends_on_every_param() -> None:
    validate = _stages()["validate"]
    assert validate["params"] == [{"params.yaml": None}]  # the whole file
    [out] = validate["outs"]
    assert out == {PARAMS_CHECK: {"cache": False, "persist": True}}


def test_a_lazily_exported_name_brings_its_module(tmp_path: Path) -> None:
    # `from polarocc import Detector` runs polarocc.detector.detector (the package's __getattr__), while a plain
    # `import polarocc` does not: only the first kind of script depends on the Detector's code.
    script = ROOT / "stages" / "_lazy_export_probe.py"
    try:
        script.write_text("from polarocc import Detector\n")
        assert "polarocc/detector/detector.py" in import_closure(script)
        script.write_text("import polarocc\n")
        assert "polarocc/detector/detector.py" not in import_closure(script)
    finally:
        script.unlink()
