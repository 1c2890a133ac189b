"""``polarocc plan``: image counts, store bytes against real stores, statistics modes, DVC cache, the disk check."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import zarr
from typer.testing import CliRunner

from polarocc import layout
from polarocc.cli import app
from polarocc.config import load_params
from polarocc.errors import DataError
from polarocc.features.budget import folder_bytes, human_bytes, statistics_bytes_per_image
from polarocc.planning import dvc_cache_link, make_plan, measure_backbone
from tests.conftest import write_params

runner = CliRunner()


def _array_bytes(store: Path) -> dict[str, int]:
    """Uncompressed bytes of a store's data arrays, by name (the ``done`` flags left out)."""
    out: dict[str, int] = {}
    group = zarr.open_group(store, mode="r")
    for split in ("train", "test"):
        for name, array in group[split].arrays():
            if name != "done":
                out[name] = out.get(name, 0) + array.nbytes
    return out


def _project(params_dict: dict, folder: Path, mvtec: Path, **train: object) -> Path:
    raw = copy.deepcopy(params_dict)
    raw["datasets"] = {"mine": {"format": "mvtec", "path": str(mvtec), "categories": ["brick", "gravel"]}}
    raw["protocol_a"]["datasets"] = {}
    raw["protocol_c"] = {"datasets": [], "seed": 5}
    raw["train"].update(train)
    folder.mkdir(parents=True, exist_ok=True)
    return write_params(raw, folder)


def test_plan_bytes_match_the_extracted_stores(extracted_project: Path) -> None:
    params = load_params(extracted_project / "params.yaml")
    plan = make_plan(params)
    (mine,) = plan.datasets
    # TINY_SPEC: 6 train, 3 good and 1 per defect type (4 types) per category, 2 categories, read from the files
    assert (mine.source, mine.categories, mine.train, mine.test, mine.test_good, mine.test_defective) == \
        ("files", 2, 12, 14, 6, 8)
    arrays = [_array_bytes(layout.feature_store(params, "mine", c)) for c in ("brick", "gravel")]
    assert mine.bytes.features == sum(a["features"] for a in arrays)
    assert mine.bytes.statistics == sum(a.get("gram", 0) + a["sums"] for a in arrays)
    assert mine.bytes.masks == sum(a["masks"] for a in arrays)
    on_disk = sum(folder_bytes(layout.feature_store(params, "mine", c)) for c in ("brick", "gravel"))
    assert 0.5 * mine.bytes.features < on_disk < mine.bytes.total * 1.1 + 200_000  # float16 barely compresses
    assert plan.backbone.channels == 176 and (plan.backbone.height, plan.backbone.width) == (16, 16)
    assert plan.dvc_cache["bytes"] == 0  # the tmp project is no DVC project
    assert plan.disk["needed"] == plan.store_bytes.total + plan.model_bytes and plan.disk["fits"]
    for stage in ("extract", "train", "score"):
        assert 512 * 2 ** 20 < plan.memory[stage] < plan.memory["total"]
    json.dumps(plan.to_dict())


def test_stored_statistics_cost_a_gram_matrix_per_training_image(params_dict: dict, mvtec_tree: Path,
                                                                 tmp_path: Path) -> None:
    stored = load_params(_project(params_dict, tmp_path / "a", mvtec_tree, statistics="stored"))
    shape = measure_backbone(stored)
    streamed = load_params(_project(params_dict, tmp_path / "b", mvtec_tree, statistics="streamed"))
    big, small = make_plan(stored, shape), make_plan(streamed, shape)
    assert (big.statistics, small.statistics) == ("stored", "streamed")
    c = shape.channels
    assert small.store_bytes.statistics == 12 * c * 8  # only the sums
    assert big.store_bytes.statistics - small.store_bytes.statistics == 12 * (statistics_bytes_per_image(c) - c * 8)
    assert big.store_bytes.features == small.store_bytes.features
    assert big.memory["extract"] > small.memory["extract"]


def test_stored_store_matches_and_extraction_checks_the_disk(params_dict: dict, mvtec_tree: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from polarocc.pipeline.extract import run_extract

    params = load_params(_project(params_dict, tmp_path, mvtec_tree, statistics="stored"))
    params = replace(params, datasets={"mine": replace(params.datasets["mine"], categories=("brick",))})
    plan = make_plan(params)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    needed = human_bytes(plan.store_bytes.total)
    with pytest.raises(DataError, match=rf"extracting datasets\.mine needs {needed} at data/features/mine but only "
                                        r"1\.0 kB is free.*train\.statistics"):
        run_extract(params, "mine", progress=False, check_files=False)
    store, partial = layout.feature_store(params, "mine", "brick"), layout.partial_store(params, "mine", "brick")
    assert not store.exists() and not partial.exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    run_extract(params, "mine", progress=False, check_files=False)
    arrays = _array_bytes(store)
    assert "gram" in arrays
    assert plan.store_bytes.statistics == arrays["gram"] + arrays["sums"]
    assert plan.store_bytes.total == sum(arrays.values())


def test_embedded_counts_come_from_params_until_generated(params_dict: dict, mvtec_tree: Path,
                                                         tmp_path: Path) -> None:
    # tiny params: textures at data/textures (not generated yet), digits classes 0 and 7 for Protocol A
    params = load_params(write_params(params_dict, tmp_path))
    shape = measure_backbone(params)
    textures, digits = make_plan(params, shape).datasets
    assert (textures.source, textures.categories, textures.train, textures.test_good, textures.test_defective) == \
        ("embedded_data params", 2, 12, 6, 8)
    assert (digits.protocol, digits.categories, digits.train + digits.test) == ("A", 2, 1797)
    assert digits.bytes.total == 1797 * shape.pooled_channels * 4  # float32 pooled features only
    # the same params generate exactly that many files (mvtec_tree was made with the same counts)
    shutil.copytree(mvtec_tree, tmp_path / "data" / "textures")
    generated = make_plan(params, shape).datasets[0]
    assert generated.source == "files"
    assert (generated.train, generated.test, generated.bytes) == (textures.train, textures.test, textures.bytes)


def test_a_run_with_only_protocol_a_datasets_is_planned(params_dict: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(params_dict)
    raw["datasets"], raw["protocol_c"]["datasets"] = {}, []
    plan = make_plan(load_params(write_params(raw, tmp_path)))
    assert [d.protocol for d in plan.datasets] == ["A"]
    assert plan.memory["train"] > 0 and plan.memory["score"] > 0


def test_dvc_cache_counts_copies_but_not_links(params_dict: dict, mvtec_tree: Path, tmp_path: Path) -> None:
    from dvc.repo import Repo

    params = load_params(_project(params_dict, tmp_path, mvtec_tree))
    Repo.init(str(tmp_path), no_scm=True).close()
    config = tmp_path / ".dvc" / "config"
    core = config.read_text()  # [core] no_scm = True
    config.write_text(core + "[cache]\n    type = copy\n")
    plan = make_plan(params)
    assert plan.dvc_cache["link"] == "copy"
    assert plan.dvc_cache["bytes"] == plan.store_bytes.total + plan.model_bytes > 0
    config.write_text(core + "[cache]\n    type = hardlink,symlink\n")
    link, types, _ = dvc_cache_link(tmp_path, tmp_path)
    assert types == ["hardlink", "symlink"] and link == "hardlink"  # hardlinks work on any local disk
    config.write_text(core + "[cache]\n    type = reflink,hardlink,symlink\n")
    link, types, note = dvc_cache_link(tmp_path, tmp_path)
    assert types == ["reflink", "hardlink", "symlink"]
    assert link == "reflink" or (link == "copy" and "put hardlink first" in note)  # ext4: no reflinks
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dvc", ".dvcignore", "params.yaml"]  # no probe left


def test_cli_plan_prints_a_table_and_json(extracted_project: Path) -> None:
    params = str(extracted_project / "params.yaml")
    table = runner.invoke(app, ["plan", "--params", params])
    assert table.exit_code == 0, table.output
    assert "176 x 16 x 16" in table.output and "mine" in table.output and "fits" in table.output
    as_json = runner.invoke(app, ["plan", "--params", params, "--json"])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert [d["name"] for d in data["datasets"]] == ["mine"] and data["fits"] is True
    assert data["datasets"][0]["train"] == 12 and data["disk"]["free"] > 0


def test_cli_plan_exits_1_when_the_run_does_not_fit(extracted_project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10))
    result = runner.invoke(app, ["plan", "--params", str(extracted_project / "params.yaml")])
    assert result.exit_code == 1 and "DOES NOT FIT" in result.output


def test_plan_accounts_for_tiles_and_the_aspect_ratio(params_dict: dict, tmp_path: Path, mvtec_tree: Path) -> None:
    """An aspect-preserving, tiled geometry is planned at the size extraction will use: the feature maps of the
    whole stitched input (and their bytes), the tiles per image."""
    path = _project(params_dict, tmp_path / "p", mvtec_tree)
    paper = make_plan(load_params(path))
    tiled_raw = copy.deepcopy(params_dict)
    tiled_raw["datasets"] = {"mine": {"format": "mvtec", "path": str(mvtec_tree), "categories": ["brick", "gravel"]}}
    tiled_raw["protocol_a"]["datasets"] = {}
    tiled_raw["protocol_c"] = {"datasets": [], "seed": 5}
    tiled_raw["backbone"].update(resize={"shorter_side": 192}, crop=None, tiles={"size": 64, "overlap": 0.25})
    tiled = make_plan(load_params(write_params(tiled_raw, tmp_path / "p")))
    s = tiled.backbone
    # The generated images are square (64 px): 192 x 192, 4 tiles per axis, 48 x 48 positions of stride 4.
    assert (s.input_size, s.tiles, s.height, s.width) == ((192, 192), 16, 48, 48)
    assert s.geometry_source.startswith(str(mvtec_tree / "brick/train/good"))
    (mine_paper,), (mine_tiled,) = paper.datasets, tiled.datasets
    assert mine_tiled.bytes.features == pytest.approx(mine_paper.bytes.features * (48 * 48) / (16 * 16), rel=1e-9)
    output = runner.invoke(app, ["plan", "--params", str(tmp_path / "p/params.yaml")])
    assert output.exit_code == 0, output.output
    assert "input 192x192 in 16 tiles" in output.output
