"""What polarocc may delete or overwrite: only what it created, and only inside the folder it belongs to.

A folder polarocc creates as a whole (the embedded dataset, a ``polarocc predict`` output folder, a VisA
conversion) carries a marker file, :data:`MARKER`. Such a folder may later be replaced or removed; any
other existing folder is refused with an error naming the key or option that pointed at it. Paths built
from params or data (dataset and category names, CSV rows) are checked to stay inside their root.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from polarocc.errors import UnsafePathError

MARKER = ".polarocc-output"
MARKER_TEXT = "This folder was written by polarocc, which may replace or remove it as a whole.\n"
# A dataset, category or file name that is one harmless path component.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+ -]*$")

T = TypeVar("T")


def is_plain_name(name: object) -> bool:
    """True for a single harmless path component: no separators, no ``..``, not only dots or spaces."""
    return isinstance(name, str) and bool(NAME.match(name)) and name.strip(". ") != "" and ".." not in name


def safe_name(name: object, key: str) -> str:
    """``name`` if it is a single plain path component (see :func:`is_plain_name`), else an error naming ``key``."""
    if not is_plain_name(name):
        raise UnsafePathError(f"{key}: {name!r} cannot name a folder or file: use letters, digits, '_', '-', '.', "
                              "'+' or spaces, starting with a letter, digit or '_' (no '/', '\\' or '..')")
    return name


def inside(root: Path, path: Path, key: str) -> Path:
    """``path`` resolved, if it lies inside ``root`` (resolved); else an error naming ``key``."""
    base, target = Path(root).resolve(), Path(path).resolve()
    if target != base and base not in target.parents:
        raise UnsafePathError(f"{key}: {path} resolves to {target}, outside {base}; paths from params or data "
                              "must stay inside that folder")
    return target


def is_owned(folder: Path) -> bool:
    """True when ``folder`` carries polarocc's marker."""
    return (Path(folder) / MARKER).is_file()


def _is_empty_dir(folder: Path) -> bool:
    return folder.is_dir() and not any(folder.iterdir())


def check_replaceable(folder: Path, key: str, known: frozenset[Path] = frozenset()) -> None:
    """Fail unless ``folder`` is absent, empty, was written by polarocc (carries the marker) or is one of the
    ``known`` outputs (resolved paths the project's own records say it wrote, e.g. dvc.lock's)."""
    folder = Path(folder)
    if not folder.exists() or _is_empty_dir(folder) or is_owned(folder) or folder.resolve() in known:
        return
    what = "a file" if not folder.is_dir() else "a folder polarocc did not create (it has no " + MARKER + " marker)"
    raise UnsafePathError(f"{key}: {folder} is {what}; polarocc never deletes or overwrites what it did not "
                          "create. Choose a new or empty folder, or remove that one yourself")


def claim(folder: Path, key: str) -> Path:
    """Make ``folder`` polarocc's: create it (or take it while empty) and write the marker."""
    folder = Path(folder)
    check_replaceable(folder, key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(MARKER_TEXT)
    return folder


@contextlib.contextmanager
def _staging(final: Path) -> Iterator[Path]:
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover from a crashed run of this process id
    staging.mkdir(parents=True)
    (staging / MARKER).write_text(MARKER_TEXT)
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


def replace_folder(final: Path, key: str, build: Callable[[Path], T], known: frozenset[Path] = frozenset()) -> T:
    """Build a folder's whole content in a sibling staging folder with ``build(staging)``, then put it in place
    of ``final``. ``final`` is checked first: it must be absent, empty or polarocc's own (see
    :func:`check_replaceable`). A failure in ``build`` leaves ``final`` as it was."""
    final = Path(final).resolve()
    if final == Path.cwd().resolve() or final in Path.cwd().resolve().parents:
        raise UnsafePathError(f"{key}: {final} is the current folder or holds it; name a folder to write, such as "
                              "predictions")
    check_replaceable(final, key, known)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UnsafePathError(f"{key}: cannot create the folder {final.parent} ({exc.strerror}); choose another "
                              "path") from exc
    with _staging(final) as staging:
        result = build(staging)
        swap_in(staging, final)
    return result
