"""What polarocc may delete or overwrite: only what it created, and only inside the folder it belongs to.

A folder polarocc creates (the embedded dataset, a ``polarocc predict`` output folder, a VisA conversion)
carries a marker file, :data:`MARKER`, saying which step wrote it and listing every file it wrote there.
Such a folder may later be replaced by the same step, as long as it holds nothing else; any other existing
folder is refused with an error naming the key or option that pointed at it. Paths built from params or
data (dataset and category names, CSV rows) are checked to stay inside their root.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from polarocc.atomic import write_json
from polarocc.errors import UnsafePathError

MARKER = ".polarocc-output"
NOTE = "Written by polarocc: it may replace this folder as long as it holds only the files listed here."
# A dataset, category or file name that is one harmless path component (spaces allowed only where asked).
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+ -]*$")

T = TypeVar("T")


def is_plain_name(name: object, spaces: bool = True) -> bool:
    """True for a single harmless path component: no separators, no ``..``, not only dots or spaces (and no
    spaces at all unless ``spaces``: names that go into shell commands, such as dvc.yaml's stage arguments)."""
    return (isinstance(name, str) and bool(NAME.match(name)) and name.strip(". ") != "" and ".." not in name
            and (spaces or " " not in name))


def safe_name(name: object, key: str, spaces: bool = True) -> str:
    """``name`` if it is a single plain path component (see :func:`is_plain_name`), else an error naming ``key``."""
    if not is_plain_name(name, spaces):
        allowed = "letters, digits, '_', '-', '.', '+'" + (" or spaces" if spaces else "")
        raise UnsafePathError(f"{key}: {name!r} cannot name a folder or file: use {allowed}, starting with a "
                              "letter, digit or '_' (no '/', '\\' or '..')")
    return name


def inside(root: Path, path: Path, key: str) -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved); else an error naming ``key``."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{key}: {path} resolves to {target}, outside {base}; paths from params or data "
                              "must stay inside that folder")
    return target


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder polarocc wrote: ``{"kind": ..., "files": [...]}`` (what wrote it, and every file it
    wrote there, relative); None when there is none or it is not one of polarocc's."""
    try:
        marker = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or not isinstance(marker.get("kind"), str)
            or not isinstance(marker.get("files"), list)):
        return None
    return marker


def write_marker(folder: Path, kind: str, files: list[str]) -> None:
    """Mark ``folder`` as written by polarocc's ``kind`` step, listing the ``files`` it wrote there."""
    write_json(Path(folder) / MARKER, {"kind": kind, "note": NOTE, "files": sorted(set(files))}, indent=0,
               newline=True)


def files_in(folder: Path) -> list[str]:
    """Every file below ``folder`` (relative, '/'-separated), the marker excepted."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.name != MARKER)


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def check_replaceable(folder: Path, key: str, kind: str, known: frozenset[Path] = frozenset()) -> None:
    """Fail unless polarocc may replace ``folder`` as a whole: it is absent or empty, or polarocc's ``kind`` step
    wrote it and it holds nothing else (every file is in its marker), or it is one of the ``known`` outputs
    (resolved paths the project's own records say it wrote, e.g. the prepare stage's in dvc.lock)."""
    folder = Path(folder)
    if not folder.exists() or _is_empty_dir(folder) or folder.resolve() in known:
        return
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None:
        what = "a file" if not folder.is_dir() else f"a folder polarocc did not create (it has no {MARKER} marker)"
        raise UnsafePathError(f"{key}: {folder} is {what}; polarocc never deletes or overwrites what it did not "
                              "create. Choose a new or empty folder, or remove that one yourself")
    if marker["kind"] != kind:
        raise UnsafePathError(f"{key}: {folder} holds the output of polarocc {marker['kind']}, not of {kind}; "
                              "choose another folder")
    extra = sorted(set(files_in(folder)) - set(marker["files"]))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UnsafePathError(f"{key}: {folder} holds {extra[0]}{more}, which polarocc did not write; replacing the "
                              "folder would delete it. Move it away or choose another folder")


def claim(folder: Path, key: str, kind: str) -> dict:
    """Make ``folder`` a ``kind`` output that polarocc adds files to: create it (or take it while empty) and mark
    it; a folder another step or someone else wrote is refused. Returns its marker."""
    folder = Path(folder)
    if folder.exists() and not _is_empty_dir(folder):
        marker = read_marker(folder) if folder.is_dir() else None
        if marker is None or marker["kind"] != kind:
            check_replaceable(folder, key, kind)  # raises, naming what is wrong
        return marker
    folder.mkdir(parents=True, exist_ok=True)
    write_marker(folder, kind, [])
    return {"kind": kind, "files": []}


def record(folder: Path, kind: str, files: list[str]) -> None:
    """Add ``files`` (relative to ``folder``) to the marker of a folder :func:`claim` took, before writing them:
    a run that stops half-way can then still replace them on the next run."""
    marker = read_marker(folder) or {"files": []}
    write_marker(folder, kind, [*marker["files"], *files])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers(final: Path, kind: str) -> None:
    """Staging or set-aside folders of ``final`` left by a run that was killed (their process is gone)."""
    for path in final.parent.glob(f".{final.name}.*-*"):
        stem, _, pid = path.name.rpartition("-")
        marker = read_marker(path)
        if (stem in (f".{final.name}.partial", f".{final.name}.old") and pid.isdigit() and not _alive(int(pid))
                and marker is not None and marker["kind"] == kind):
            shutil.rmtree(path)


@contextlib.contextmanager
def _staging(final: Path, kind: str) -> Iterator[Path]:
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from a crashed run of this process id
    staging.mkdir(parents=True)
    write_marker(staging, kind, [])
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def swap_in(staging: Path, final: Path) -> None:
    """Move the complete folder ``staging`` to ``final``; the previous ``final`` is removed only after."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    if old.exists():
        shutil.rmtree(old)


def replace_folder(final: Path, key: str, kind: str, build: Callable[[Path], T],
                   known: frozenset[Path] = frozenset()) -> T:
    """Build a folder's whole content in a sibling staging folder with ``build(staging)``, then put it in place
    of ``final``, marked as ``kind``'s with the list of its files. ``final`` is checked first (see
    :func:`check_replaceable`). A failure in ``build`` leaves ``final`` as it was."""
    final = Path(final).resolve()
    if final == Path.cwd().resolve() or final in Path.cwd().resolve().parents:
        raise UnsafePathError(f"{key}: {final} is the current folder or holds it; name a folder to write, such as "
                              "predictions")
    check_replaceable(final, key, kind, known)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnsafePathError(f"{key}: cannot create the folder {final.parent} ({exc.strerror}); choose another "
                              "path") from exc
    _remove_leftovers(final, kind)
    with _staging(final, kind) as staging:
        result = build(staging)
        write_marker(staging, kind, files_in(staging))
        swap_in(staging, final)
    return result
