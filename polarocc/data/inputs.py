"""Which images a command reads: files, folders (recursively), globs and list files, in a stable order."""

from __future__ import annotations

import glob
from pathlib import Path

from polarocc.errors import DataError
from polarocc.layout import file_stem

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def collect_images(inputs: list[str], list_file: Path | None = None) -> list[Path]:
    """Image paths in the given order: a folder contributes its images sorted by path, a glob its sorted
    matches, a list file one path per line (relative to the list file; '#' starts a comment)."""
    entries = list(inputs)
    if list_file is not None:
        if not list_file.is_file():
            raise DataError(f"list file {list_file} does not exist")
        try:
            text = list_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the list file {list_file} as UTF-8 text ({exc}); give one image path per "
                            "line") from exc
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                path = Path(line)
                entries.append(str(path if path.is_absolute() else list_file.parent / path))
    found: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if _is_image(p))
            if not images:
                raise DataError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += images
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(entry):
            matches = sorted(Path(p) for p in glob.glob(entry, recursive=True) if _is_image(Path(p)))
            if not matches:
                raise DataError(f"pattern {entry!r} matches no images")
            found += matches
        else:
            raise DataError(f"{entry} is not an image file, a folder or a glob pattern that matches images")
    if not found:
        raise DataError("no input images: give image files, folders, glob patterns or --list")
    seen: set[Path] = set()
    unique: list[Path] = []
    for path in found:  # the first occurrence of each file wins, however it was spelled
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(path)
    return unique


def output_names(images: list[Path]) -> list[str]:
    """A unique, file-safe name per image from its path below the inputs' common folder
    (MVTec's test/crack/000.png and test/good/000.png stay apart)."""
    resolved = [p.resolve() for p in images]
    parents = [p.parent for p in resolved]
    common = Path(*Path(str(parents[0])).parts[:_common_depth(parents)])
    names = [file_stem(str(p.relative_to(common).with_suffix("")).replace("/", "__")) for p in resolved]
    if len(set(names)) != len(names):  # the same file name from several suffix variants (a.png, a.jpg)
        names = [file_stem(str(p.relative_to(common)).replace("/", "__")) for p in resolved]
    return names


def _common_depth(folders: list[Path]) -> int:
    depth = 0
    for parts in zip(*(f.parts for f in folders), strict=False):
        if len(set(parts)) != 1:
            break
        depth += 1
    return depth
