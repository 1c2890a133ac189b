"""Extraction on a dask cluster and after a SIGKILL gives the same store as an uninterrupted in-process run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from polarocc import layout
from polarocc.config import load_params
from polarocc.pipeline.extract import run_extract
from tests.conftest import ROOT

pytestmark = pytest.mark.integration

ARRAYS = ("train/features", "train/gram", "train/sums", "test/features", "test/masks")


def _assert_same_store(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    assert ga.attrs["fingerprint"] == gb.attrs["fingerprint"] and gb.attrs["complete"]
    present = [name for name in ARRAYS if name in ga]  # train/gram only where statistics are stored
    assert present == [name for name in ARRAYS if name in gb] and "train/sums" in present
    for name in present:
        assert np.array_equal(ga[name][:], gb[name][:]), name


def _project(extracted_project: Path, folder: Path, statistics: str = "auto", **extract) -> Path:
    shutil.copytree(extracted_project, folder)
    shutil.rmtree(folder / "data", ignore_errors=True)
    raw = yaml.safe_load((folder / "params.yaml").read_text())
    raw["extract"].update(extract)
    raw["train"]["statistics"] = statistics
    (folder / "params.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.parametrize("statistics", ["auto", "stored"])  # auto: streamed at these tiny 16 x 16 maps
def test_two_worker_local_cluster_writes_the_in_process_store(extracted_project: Path, tmp_path: Path,
                                                              statistics: str) -> None:
    # Conv kernels sum in an order that depends on the thread count: give the workers the in-process count.
    project = _project(extracted_project, tmp_path / "dask", statistics, scheduler="local", workers=2,
                       threads_per_worker=torch.get_num_threads())
    params = load_params(project / "params.yaml")
    computed = run_extract(params, "mine", progress=False)
    reference = load_params(extracted_project / "params.yaml")
    if statistics == "stored":
        reference = load_params(_project(extracted_project, tmp_path / "inprocess", statistics) / "params.yaml")
        run_extract(reference, "mine", progress=False)
        assert "train/gram" in zarr.open_group(layout.feature_store(params, "mine", "brick"), mode="r")
    for category in ("brick", "gravel"):
        assert computed[category] == {"train": 2, "test": 2}  # 6 and 7 images in shards of 4
        _assert_same_store(layout.feature_store(reference, "mine", category),
                           layout.feature_store(params, "mine", category))


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
        _assert_same_store(layout.feature_store(params_whole, "mine", category),
                           layout.feature_store(params_killed, "mine", category))


def _fashion_mnist_tree(root: Path, train: int = 100, test: int = 40) -> Path:
    """A small Fashion-MNIST tree (idx files) of random images: an in-memory Protocol A dataset."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (root / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    return root


def test_protocol_a_on_a_two_worker_cluster_equals_in_process(params_dict: dict, tmp_path: Path) -> None:
    # Fashion-MNIST lives in memory: each task carries its shard's images to the worker instead of file paths.
    from polarocc.config import parse_params
    from polarocc.detector.protocol_a import STORE_NAME, run_extract_a

    dataset = {"format": "fashion_mnist", "path": str(_fashion_mnist_tree(tmp_path / "fm")), "classes": "all"}
    stores = {}
    for scheduler in ("inprocess", "local"):
        raw = {**params_dict, "protocol_a": {**params_dict["protocol_a"], "datasets": {"fm": dataset}},
               "extract": {**params_dict["extract"], "scheduler": scheduler, "workers": 2,
                           "threads_per_worker": torch.get_num_threads()}}
        params = parse_params(raw, tmp_path / scheduler)
        computed = run_extract_a(params, "fm", progress=False)
        assert computed == {"train": 2, "test": 1}  # 100 and 40 images in shards of 64
        stores[scheduler] = layout.feature_store(params, "fm", STORE_NAME)
    a, b = (zarr.open_group(stores[s], mode="r") for s in ("inprocess", "local"))
    assert a.attrs["fingerprint"] == b.attrs["fingerprint"] and b.attrs["complete"]
    for name in ("train/features", "test/features"):
        assert np.array_equal(a[name][:], b[name][:]), name
        assert np.isfinite(a[name][:]).all() and a[name][:].std() > 0


_CONCURRENCY = {"running": 0, "peak": 0}
_CONCURRENCY_LOCK = threading.Lock()


def _recording_shard(spec, store: str, split: str, shard: int, records, raw=None) -> int:
    """Stands in for a shard task in a threaded worker: records how many run at once, marks the shard done."""
    with _CONCURRENCY_LOCK:
        _CONCURRENCY["running"] += 1
        _CONCURRENCY["peak"] = max(_CONCURRENCY["peak"], _CONCURRENCY["running"])
    time.sleep(0.2)
    zarr.open_group(store, mode="r+")[split]["done"][shard] = True
    with _CONCURRENCY_LOCK:
        _CONCURRENCY["running"] -= 1
    return shard


def test_cuda_tasks_ask_for_a_gpu_so_each_gpu_runs_one_at_a_time(tmp_path: Path, monkeypatch) -> None:
    # A threaded worker with four threads and one GPU: without the resource it would run four tasks at once.
    # The task is replaced by one that only records concurrency (no CUDA here).
    from dask.distributed import Client, LocalCluster

    from polarocc.data.samples import Sample
    from polarocc.features import distributed
    from polarocc.features import store as fs

    monkeypatch.setattr(distributed, "extract_shard", _recording_shard)
    samples = {split: [Sample(Path(f"{split}/{i}.png"), 0) for i in range(8)] for split in fs.SPLITS}
    layout = fs.StoreLayout(4, 2, 2, 8, shard_images=1)
    for device, expected_peak in (("cuda", 1), ("cpu", 4)):
        spec = distributed.WorkerSpec("x", (1,), 3, "none", None, None, {"resize": 8, "crop": 8}, 1, "float16", device)
        cluster = LocalCluster(n_workers=1, threads_per_worker=4, processes=False, dashboard_address=None,
                               resources={"GPU": 1})
        _CONCURRENCY["peak"] = 0
        with cluster, Client(cluster) as client:
            computed = distributed.extract_category_distributed(
                client, spec, samples, layout, {}, tmp_path / f"{device}.zarr", tmp_path / f"{device}.partial",
                progress=False)
        assert computed == {"train": 8, "test": 8}
        assert _CONCURRENCY["peak"] == expected_peak


def test_workers_use_threads_per_worker_torch_threads() -> None:
    from polarocc.features.distributed import cluster_client

    with cluster_client("local", 1, 3) as client:
        assert list(client.run(torch.get_num_threads).values()) == [3]
