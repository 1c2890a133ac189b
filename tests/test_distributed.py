"""Extraction on a dask cluster and after a SIGKILL gives the same store as an uninterrupted in-process run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
import zarr

from polarocc.config import load_params
from polarocc.pipeline import paths
from polarocc.pipeline.extract import run_extract
from tests.conftest import ROOT

ARRAYS = ("train/features", "train/gram", "train/sums", "test/features", "test/masks")


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert ga.attrs["fingerprint"] == gb.attrs["fingerprint"] and gb.attrs["complete"]
    for name in ARRAYS:
        assert np.array_equal(ga[name][:], gb[name][:]), name


def _project(extracted_project: Path, folder: Path, **extract) -> Path:
    shutil.copytree(extracted_project, folder)
    shutil.rmtree(folder / "data", ignore_errors=True)
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["extract"].update(extract)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder


def test_two_worker_local_cluster_writes_the_in_process_store(extracted_project: Path, tmp_path: Path) -> None:
    # Conv kernels sum in an order that depends on the thread count: give the workers the in-process count.
    project = _project(extracted_project, tmp_path / "dask", scheduler="local", workers=2,
                       threads_per_worker=torch.get_num_threads())
    params = load_params(project / "params.yaml")
    computed = run_extract(params, "mine", progress=False)
    reference = load_params(extracted_project / "params.yaml")
    for category in ("brick", "gravel"):
        assert computed[category] == {"train": 2, "test": 2}  # 6 and 7 images in shards of 4
        _assert_same_store(paths.feature_store(reference, "mine", category),
                           paths.feature_store(params, "mine", category))


def test_sigkill_mid_extraction_then_rerun_gives_the_uninterrupted_store(extracted_project: Path,
                                                                         tmp_path: Path) -> None:
    # One image per shard at 224 px: enough shards and time for the kill to land mid-run.
    settings = {"shard_images": 1, "batch_size": 1}
    whole = _project(extracted_project, tmp_path / "whole", **settings)
    raw = yaml.safe_load((whole / "params.yaml").read_text())
    raw["backbone"].update(resize=256, crop=224)
    (whole / "params.yaml").write_text(yaml.safe_dump(raw))
    killed = tmp_path / "killed"
    shutil.copytree(whole, killed)
    command = [sys.executable, str(ROOT / "stages/extract.py"), "mine"]
    uninterrupted = subprocess.run(command, cwd=whole, capture_output=True, text=True)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    victim = subprocess.Popen(command, cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = killed / "data/.partial/mine/brick.zarr/train/done"
    deadline = time.monotonic() + 180
    done = 0
    while time.monotonic() < deadline and victim.poll() is None:
        if partial.exists():
            try:
                done = int(zarr.open_array(partial, mode="r")[:].sum())
            except Exception:  # the flags are being written
                done = 0
            if done >= 3:
                break
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert 3 <= done < 6, "the kill should land while the first category's training shards are written"

    rerun = subprocess.run(command, cwd=killed, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    computed = eval(rerun.stdout.strip().splitlines()[-1])  # the stage prints shards computed per category
    assert computed["brick"]["train"] <= 6 - done and computed["gravel"] == {"train": 6, "test": 7}
    params_whole, params_killed = load_params(whole / "params.yaml"), load_params(killed / "params.yaml")
    for category in ("brick", "gravel"):
        _assert_same_store(paths.feature_store(params_whole, "mine", category),
                           paths.feature_store(params_killed, "mine", category))
