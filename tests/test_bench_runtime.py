"""bench/runtime.py: the benchmark's params, and how it times and measures the stages of a `dvc repro`."""

from __future__ import annotations

import importlib.util
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runtime = _load()


def test_benchmark_params_make_one_category_of_the_asked_size() -> None:
    raw = runtime.benchmark_params(1000, 250)
    e = raw["embedded_data"]
    assert e["categories"] == ["brick"] and raw["datasets"]["textures"]["categories"] == ["brick"]
    assert e["train"] == 1000 and e["test_good"] + e["defects_per_type"] * len(e["defect_types"]) == 250
    assert e["test_good"] >= 62  # about a quarter good
    # Everything else is the default pipeline.
    default = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section in ("backbone", "train", "score", "sweep", "peers", "analysis", "protocol_a", "protocol_c"):
        assert raw[section] == default[section], section


def test_stages_are_timed_between_dvc_lines_and_their_memory_sampled(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in for dvc: two stages, the second holding 300 MB for a second.
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n"
                    "import time\n"
                    "print(\"Running stage 'train@1':\", flush=True); time.sleep(0.6)\n"
                    "print(\"Running stage 'train@2':\", flush=True)\n"
                    "block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1.0)\n"
                    "print('Updating lock file', flush=True)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    items, total = runtime.run_pipeline(tmp_path, tmp_path / "repro.log")
    assert list(items) == ["train@1", "train@2"]
    assert 0.5 < items["train@1"]["seconds"] < 3 and 0.9 < items["train@2"]["seconds"] < 4
    assert items["train@2"]["peak_rss_mb"] > items["train@1"]["peak_rss_mb"] + 200
    assert total >= items["train@1"]["seconds"] + items["train@2"]["seconds"]
    stages = runtime.by_stage(items)
    assert set(stages) == {"train"} and stages["train"]["items"] == 2
    assert stages["train"]["seconds"] == pytest.approx(items["train@1"]["seconds"] + items["train@2"]["seconds"],
                                                       abs=0.01)
    assert "Updating lock file" in (tmp_path / "repro.log").read_text()


def test_a_failed_repro_stops_the_benchmark_naming_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "bin" / "dvc"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nraise SystemExit(3)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SystemExit, match=r"exit 3.*repro\.log"):
        runtime.run_pipeline(tmp_path, tmp_path / "repro.log")
