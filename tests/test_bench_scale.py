"""bench/scale.py end to end on the smallest run: the real stages in fresh processes, the report's schema, cleanup."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "scale.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_category_has_the_asked_counts_and_a_defect(tmp_path: Path) -> None:
    scale = load_script()
    train, test = scale.make_dataset(tmp_path, 8, seed=3)
    assert (train, test) == (8, 2)
    assert len(list((tmp_path / "brick" / "train" / "good").glob("*.png"))) == 8
    assert len(list((tmp_path / "brick" / "test").rglob("*.png"))) == 2
    assert len(list((tmp_path / "brick" / "ground_truth").rglob("*_mask.png"))) == 1
    assert scale.parse_skip("none", ["project"]) == set()
    assert scale.parse_skip("wide_resnet50_2:stored:512", ["project", "1"]) == {
        ("wide_resnet50_2", "stored", 512, "project"), ("wide_resnet50_2", "stored", 512, "1")}
    assert scale.parse_skip("wide_resnet50_2:stored:512:1", ["project", "1"]) == {
        ("wide_resnet50_2", "stored", 512, "1")}


def test_rss_targets_are_judged_per_memory_budget() -> None:
    scale = load_script()

    def row(n: int, budget: str, train: float, score: float) -> dict:
        return {"backbone": "b", "channels": 176, "statistics": "stored", "auto_statistics": True, "train_images": n,
                "memory_budget": budget, "peak_rss_mb": {"extract": 1.0, "train": train, "score": score},
                "bytes_per_train_image": {"total": 1.0}}

    rows = [row(32, "project", 100, 100), row(512, "project", 150, 100), row(32, "1", 100, 100),
            row(512, "1", 110, 119)]
    checks = scale.targets({"rows": rows, "projection": [], "dvc_cache": {"link": "hardlink", "adds_copy": False}})
    rss = [(ok, detail) for name, ok, detail in checks if name.startswith("peak RSS")]
    assert rss == [(False, "b stored 512 vs 32: train 1.50x, score 1.00x"),
                   (True, "b stored 512 vs 32: train 1.10x, score 1.19x")]


def test_smallest_run_writes_the_schema_and_cleans_up(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    work.mkdir()
    (work / "mine").mkdir()  # not the script's: must survive
    subprocess.run([sys.executable, str(SCRIPT), "--sizes", "2", "--backbones", "tf_efficientnet_lite0",
                    "--epochs", "1", "--out", str(out), "--workdir", str(work)], check=True, cwd=tmp_path)
    result = json.loads((out / "bench_scale.json").read_text())
    assert {"machine", "rows", "projection"} <= set(result)
    assert {"cpu_count", "ram_gb", "torch", "device"} <= set(result["machine"])
    assert result["complete"] and result["epochs"] == 1 and not result["failed"]
    assert {r["statistics"] for r in result["rows"]} == {"stored", "streamed"}
    for row in result["rows"]:
        assert row["backbone"] == "tf_efficientnet_lite0" and row["channels"] == 176
        assert (row["train_images"], row["test_images"]) == (2, 2)
        b = row["bytes_per_train_image"]
        assert set(b) >= {"features", "statistics", "dvc_cache", "total"}
        assert b["total"] == pytest.approx(b["features"] + b["statistics"] + b["dvc_cache"])
        assert 0.5e6 < b["features"] < 1.5e6  # 176 x 56 x 56 float16 = 1.1 MB, barely compressed
        assert set(row["peak_rss_mb"]) >= {"extract", "train", "score"}
        assert all(v > 100 for v in row["peak_rss_mb"].values())
        assert set(row["seconds"]) >= {"extract", "train_per_variant", "score_per_variant"}
    stored = next(r for r in result["rows"] if r["statistics"] == "stored")
    streamed = next(r for r in result["rows"] if r["statistics"] == "streamed")
    # 176 x 176 float64 Gram matrix plus sums per image when stored; only the sums when streamed.
    assert stored["bytes_per_train_image"]["statistics"] > 100 * streamed["bytes_per_train_image"]["statistics"]
    assert {(p["dataset"], p["backbone"]) for p in result["projection"]} == {
        ("MVTec AD", "tf_efficientnet_lite0"), ("VisA", "tf_efficientnet_lite0")}
    assert all(p["disk_gb"] > 0 and p["peak_rss_gb"] > 0 for p in result["projection"])
    markdown = (out / "bench_scale.md").read_text()
    assert "## Targets" in markdown and "tf_efficientnet_lite0" in markdown
    assert sorted(p.name for p in work.iterdir()) == ["mine"]
