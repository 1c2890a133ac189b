"""Integration: the whole DVC pipeline at a non-paper geometry (aspect kept, no crop, tiles) on the small-defect
variant of the embedded data, then `polarocc predict` with its deployed model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from tests.conftest import ROOT, make_dvc_project, run_checked

pytestmark = pytest.mark.integration


def test_tiled_full_frame_pipeline(params_dict: dict, tmp_path: Path) -> None:
    params_dict["embedded_data"].update(variant="small_defects", image_size=160, crop=64)
    params_dict["backbone"].update(resize={"longer_side": 160}, crop=None, tiles={"size": 64, "overlap": 0.25})
    params_dict["protocol_a"]["datasets"] = {}
    project = make_dvc_project(params_dict, tmp_path / "project")
    shutil.copytree(ROOT / ".dvc/plots", project / ".dvc/plots")
    run_checked(["dvc", "repro"], project)

    brick = project / "data/textures/brick"
    assert Image.open(next((brick / "train/good").iterdir())).size == (160, 64)
    store = zarr.open_group(project / "data/features/textures/brick.zarr", mode="r")
    assert store.attrs["geometry"] == {"resize": [64, 160], "crop": None, "tiles": {"size": 64, "overlap": 0.25}}
    assert store["test/masks"].shape[1:] == (64, 160)
    assert store["train/features"].shape[2:] == (16, 40)  # stride 4 over the whole 64 x 160 input
    # Every defect type's mask survives: nothing is cut at this geometry, border defects included.
    masks = store["test/masks"][:]
    kinds = [s["defect_type"] for s in store["test"].attrs["samples"]]
    assert all(masks[i].any() for i, kind in enumerate(kinds) if kind != "good")

    extraction = json.loads((project / "reports/extract/textures.json").read_text())["categories"]["brick"]
    assert (extraction["input_height"], extraction["input_width"], extraction["tiles_per_image"]) == (64, 160, 3)
    assert extraction["seconds_per_image"] > 0 and extraction["feature_bytes_per_image"] > 0
    geometry = json.loads((project / "reports/geometry.json").read_text())["textures"]["brick"]
    assert set(geometry["image_auroc_by_defect"]) == {"tiny", "small", "border", "medium"}
    assert 0 <= geometry["aupro"] <= 1 and geometry["tiles_per_image"] == 3
    assert set(geometry["pixel_by_defect"]) == {"tiny", "small", "border", "medium"}
    assert all(0 <= v["aupro"] <= 1 and 0 <= v["pixel_auroc"] <= 1 for v in geometry["pixel_by_defect"].values())
    assert "## Input geometry" in (project / "reports/report.md").read_text()

    out = tmp_path / "predictions"
    run_checked(["polarocc", "predict", "models/deploy/textures/brick.pt", str(brick / "test/border"), "-o",
                 str(out)], project)
    maps = sorted((out / "maps").iterdir())
    assert maps and all(np.load(m).shape == (64, 160) for m in maps)
