"""DVC links outputs to its cache instead of copying them: a feature store takes its bytes once on disk.

The project's ``.dvc/config`` sets ``cache.type = hardlink,symlink``. Hardlink must come first: DVC 3 then hard-links
a stage's fresh outputs into the cache when it commits them, and it relinks a plain file only when the first
configured type it can recognise is a link. With ``reflink`` (or ``copy``) first, a regular file in the workspace
may be a reflink, so DVC leaves it as it is, and where reflinks fail (ext4) every output stays a full copy next to
its copy in the cache (treeverse/dvc#10549). Linked files are read-only and share their inode with the cache, so a
stage must never write into an existing output: DVC deletes non-persistent outputs before a stage runs, and the
integration test checks every cache object still hashes to its name after a forced rerun.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_dvc_project, run_checked

LINKED = ("hardlink", "symlink")  # link types DVC can tell from a copy, so it relinks fresh outputs
READ_ONLY = 0o444  # DVC's mode for cache files (and so for hard-linked outputs)
UP_TO_DATE = "Data and pipelines are up to date."


def _cache_types(dvc_dir: Path) -> list[str]:
    """``cache.type`` as the project's own ``.dvc/config`` sets it (not the global or local config)."""
    from dvc.config import Config

    types = Config(dvc_dir=str(dvc_dir), validate=False).load_one("repo").get("cache", {}).get("type", [])
    return [t.strip() for t in types.split(",")] if isinstance(types, str) else list(types)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def _cache_objects(project: Path) -> list[Path]:
    return [p for p in _files(project / ".dvc" / "cache" / "files") if p.is_file()]


def _disk_bytes(*folders: Path) -> int:
    """Bytes of the regular files under ``folders``, each inode counted once (as ``du`` does)."""
    seen: dict[tuple[int, int], int] = {}
    for folder in folders:
        for path in _files(folder):
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _assert_linked(project: Path, out: Path) -> dict[str, int]:
    """Every file of ``out`` is a hard link to (or a symlink into) a cache object, read-only; returns the inodes."""
    cache = {p.stat().st_ino: p for p in _cache_objects(project)}
    inodes = {}
    for path in _files(out):
        name = path.relative_to(project).as_posix()
        if path.is_symlink():
            target = Path(os.path.realpath(path))
            assert (project / ".dvc" / "cache") in target.parents, f"{name} links outside the cache: {target}"
        else:
            st = path.stat()
            assert st.st_nlink >= 2 and st.st_ino in cache, f"{name} is a copy, not a link to the DVC cache"
            assert stat.S_IMODE(st.st_mode) == READ_ONLY, f"{name} is writable: {oct(st.st_mode)}"
        inodes[name] = path.stat().st_ino
    assert inodes, f"{out} is empty"
    return inodes


def _assert_cache_intact(project: Path) -> None:
    """Every file object in the cache still hashes to its name: nothing wrote through a link into the cache."""
    objects = [p for p in _cache_objects(project) if not p.name.endswith(".dir")]
    assert objects
    for path in objects:
        assert hashlib.md5(path.read_bytes()).hexdigest() == path.parent.name + path.name, f"{path} was modified"


def _tiny_dvc_project(project: Path, config: str) -> None:
    """A DVC project with one stage that writes ``out/`` fresh (two files, one duplicated content)."""
    project.mkdir()
    run_checked(["git", "init", "-q"], project)
    run_checked(["dvc", "init", "-q"], project)
    (project / ".dvc" / "config").write_text(config)
    script = ("import pathlib; out = pathlib.Path('out'); out.mkdir(); "
              "(out / 'a.bin').write_bytes(bytes(range(256)) * 4096); (out / 'b.txt').write_text('polarocc')")
    stage = {"cmd": f'"{sys.executable}" -c "{script}"', "outs": ["out"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"write": stage}}))


def test_cache_links_never_copies() -> None:
    types = _cache_types(ROOT / ".dvc")
    assert types, ".dvc/config sets no cache.type: DVC's default (reflink,copy) copies every output on ext4"
    assert "copy" not in types, f"cache.type {types} may copy outputs into the cache"
    assert types[0] == "hardlink", (f"cache.type {types}: put hardlink first, else DVC copies fresh outputs into the "
                                    "cache and, behind reflink or copy, leaves the workspace copy in place")
    assert set(types) <= {"reflink", *LINKED}


def test_cached_outputs_are_never_persisted() -> None:
    """A persisted output is not deleted before its stage runs: a stage writing into it in place would write
    through the hard links into the cache. Only outputs kept out of the cache may persist."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    persisted = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        for out in body.get("outs", []):
            if isinstance(out, dict):
                [(path, flags)] = out.items()
                if (flags or {}).get("persist") and (flags or {}).get("cache", True):
                    persisted.append(f"{name}: {path}")
    assert not persisted, f"cached outputs with persist: true: {persisted}"


@pytest.mark.integration
def test_reflink_first_leaves_copies_where_reflinks_fail(tmp_path: Path) -> None:
    """Why hardlink comes first: on a filesystem without reflinks, ``reflink,hardlink,symlink`` copies."""
    from dvc_objects.fs.generic import test_links
    from dvc_objects.fs.local import LocalFileSystem

    probe = tmp_path / "probe"
    probe.mkdir()
    if "reflink" in test_links(["reflink"], LocalFileSystem(), str(probe), LocalFileSystem(), str(probe / "x")):
        pytest.skip("this filesystem has reflinks: reflink-first links here")
    bad, good = tmp_path / "reflink_first", tmp_path / "project_config"
    _tiny_dvc_project(bad, "[cache]\n    type = reflink,hardlink,symlink\n")
    _tiny_dvc_project(good, (ROOT / ".dvc" / "config").read_text())
    for project in (bad, good):
        run_checked(["dvc", "repro"], project)
    assert all(p.stat().st_nlink == 1 for p in _files(bad / "out"))  # copies: DVC's relink skips them
    assert _disk_bytes(bad / "out", bad / ".dvc" / "cache") >= 2 * _disk_bytes(bad / "out")
    _assert_linked(good, good / "out")
    assert _disk_bytes(good / "out", good / ".dvc" / "cache") < 1.01 * _disk_bytes(good / "out")


@pytest.mark.integration
def test_feature_stores_are_linked_not_copied(params_dict: dict, tmp_path: Path) -> None:
    from polarocc.planning import dvc_cache_link

    project = make_dvc_project(params_dict, tmp_path / "project")
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    features, cache = project / "data" / "features" / "textures", project / ".dvc" / "cache"

    run_checked(["dvc", "repro", "extract@textures"], project)

    inodes = _assert_linked(project, features)
    assert any(name.endswith("/train/features/zarr.json") for name in inodes)
    workspace = (features, project / "data" / "textures")  # every cached output so far (prepare's and ours)
    one_copy = _disk_bytes(*workspace)
    assert _disk_bytes(features) > 10**6
    assert _disk_bytes(*workspace, cache) - one_copy < 64 * 1024  # the cache adds only its .dir listings
    assert UP_TO_DATE in run_checked(["dvc", "status", "extract@textures"], project)
    link, types, _ = dvc_cache_link(project, project / "data" / "features")
    assert link == types[0] == "hardlink"  # what `polarocc plan` counts: no cache bytes

    shutil.rmtree(features)  # the workspace copy only: the cache still holds every object
    run_checked(["dvc", "checkout", "data/features/textures"], project)
    assert _assert_linked(project, features) == inodes  # the same cache objects, linked back
    assert UP_TO_DATE in run_checked(["dvc", "status", "extract@textures"], project)

    # Over read-only linked files:
    run_checked(["dvc", "repro", "--force", "--single-item", "extract@textures"], project)
    _assert_linked(project, features)
    _assert_cache_intact(project)
    # Extraction is deterministic: the fresh files hash to the same objects, so nothing new is kept.
    assert _disk_bytes(*workspace, cache) - _disk_bytes(*workspace) < 64 * 1024
    assert UP_TO_DATE in run_checked(["dvc", "status", "extract@textures"], project)
