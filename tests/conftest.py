"""Shared fixtures: tiny generated datasets in MVTec layout and a small params file."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from polarocc.data.textures import TextureSpec, make_textures

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = TextureSpec(train=6, test_good=3, defects_per_type=1, crop=96, image_size=64)


@pytest.fixture(scope="session")
def default_params() -> dict:
    """The project's params.yaml as a dict."""
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture
def params_dict(default_params: dict) -> dict:
    """A small, valid params mapping whose textures live under tmp_path."""
    return tiny_params(default_params)


def tiny_params(default_params: dict) -> dict:
    """The project's params shrunk to a few tiny images (64 px crops, 2 categories, 3 epochs)."""
    raw = copy.deepcopy(default_params)
    raw["datasets"] = {"textures": {"format": "mvtec", "path": "data/textures", "categories": ["brick", "gravel"]}}
    raw["embedded_data"].update(categories=["brick", "gravel"], train=6, test_good=3, defects_per_type=1, crop=96,
                           image_size=72)
    raw["backbone"].update(resize=72, crop=64)
    raw["extract"].update(shard_images=4, batch_size=4)
    raw["train"].update(epochs=3, batch_size=4)
    raw["sweep"] = {"norms": [1, 8], "distributions": ["normal", "ones"]}
    raw["protocol_a"].update(resize=32, crop=32, epochs=2)
    raw["analysis"].update(tsne_points=60, overlays_per_category=2)
    raw["protocol_a"]["datasets"]["digits"]["classes"] = ["0", "7"]
    return raw


@pytest.fixture(scope="session")
def mvtec_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-category dataset in MVTec AD layout made from the real texture photos."""
    root = tmp_path_factory.mktemp("mvtec")
    make_textures(root, ("brick", "gravel"), TINY_SPEC, seed=7)
    return root


def write_params(raw: dict, folder: Path) -> Path:
    """Write a params mapping to folder/params.yaml."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def lite0():
    """The offline ImageNet EfficientNet-Lite0 feature extractor, layers 1-3."""
    from polarocc.models.backbone import build_extractor

    return build_extractor("tf_efficientnet_lite0", (1, 2, 3), pool=3, weights="package")


@pytest.fixture(scope="session")
def extracted_project(tmp_path_factory: pytest.TempPathFactory, default_params: dict, mvtec_tree: Path) -> Path:
    """A project folder whose params point at ``mvtec_tree`` (Protocol B and C, no Protocol A), features
    already extracted. Tests copy it before writing into it."""
    from polarocc.config import load_params
    from polarocc.pipeline.extract import run_extract

    folder = tmp_path_factory.mktemp("project")
    raw = tiny_params(default_params)
    raw["datasets"] = {"mine": {"format": "mvtec", "path": str(mvtec_tree), "categories": ["brick", "gravel"]}}
    raw["protocol_a"]["datasets"] = {}
    raw["protocol_c"] = {"datasets": ["mine"], "seed": 5}
    params = load_params(write_params(raw, folder))
    run_extract(params, "mine", progress=False)
    return folder


@pytest.fixture
def project_copy(extracted_project: Path, tmp_path: Path) -> Path:
    """A writable copy of :func:`extracted_project` for one test."""
    folder = tmp_path / "project"
    shutil.copytree(extracted_project, folder)
    return folder


DVC_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def run_checked(args: list[str], cwd: Path) -> str:
    """Run a command (git, dvc, a stage) in ``cwd``; fail the test with its output unless it succeeds."""
    result = subprocess.run(args, cwd=cwd, env=DVC_ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def make_dvc_project(raw: dict, folder: Path) -> Path:
    """A fresh git + DVC project in ``folder``: this repository's pipeline and code with the params ``raw``."""
    folder.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, folder)
    for name in ("stages", "polarocc"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(raw, folder)
    run_checked(["git", "init", "-q"], folder)
    run_checked(["dvc", "init", "-q"], folder)
    return folder
