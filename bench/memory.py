"""Peak memory against the image count: training, scoring and the peers on generated WRN50-size features.

Writes reports/bench_memory.json and reports/bench_memory.md. Each measurement runs in a fresh process
(peak RSS from getrusage), on a store of ``base * scale`` training and test images with features of
1792 x 56 x 56 in float16 (Wide-ResNet50 layers 1-3 at 224 px), for scales 1, 4 and 16.

    python bench/memory.py [--base 4] [--scales 1 4 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reporting import REPORTS, write_results  # noqa: E402
from polarocc.config import PeersConfig, ScoreConfig, TrainConfig, parse_params  # noqa: E402
from polarocc.data.images import Geometry  # noqa: E402
from polarocc.data.samples import Sample  # noqa: E402
from polarocc.features import store as fs  # noqa: E402
from polarocc.features.extract import CategoryExtractor  # noqa: E402
from polarocc.features.store import FeatureStore  # noqa: E402

CHANNELS, SIDE, CROP = 1792, 56, 224
TASKS = ("train", "score", "padim", "patchcore")
# glibc raises its mmap threshold after large frees, then serves later large buffers from a heap it seldom
# returns: RSS then creeps up with the number of batches. A fixed threshold shows what the code itself holds.
ALLOCATORS = {"glibc default": {}, "MALLOC_MMAP_THRESHOLD_=1048576": {"MALLOC_MMAP_THRESHOLD_": "1048576"}}


def make_store(path: Path, images: int, seed: int = 0) -> dict:
    """A complete store of ``images`` train and test images of random features (Gram statistics included)."""
    layout = fs.StoreLayout(CHANNELS, SIDE, SIDE, CROP, "float16", shard_images=2, compressor="lz4", level=5)
    # Every other test image is anomalous, with a square defect written into its mask below.
    samples = {split: [Sample(Path(f"{split}/{i:04d}.png"), int(split == "test" and i % 2 == 1)) for i in range(images)]
               for split in fs.SPLITS}
    group = fs.create_or_resume(path, "bench", layout, samples, {"geometry": {"resize": 256, "crop": CROP}})
    writer = CategoryExtractor.__new__(CategoryExtractor)  # only its write() is used: no backbone
    writer.geometry = Geometry(256, CROP)
    rng = np.random.default_rng(seed)
    for split, items in samples.items():
        size = fs.shard_size(group, split)
        for shard in fs.pending_shards(group, split):
            part = items[shard * size:(shard + 1) * size]
            features = (rng.standard_normal((len(part), CHANNELS, SIDE, SIDE), dtype=np.float32) + 0.5)
            writer.write(group[split], shard, size, part, features.astype(np.float16))
    masks = group["test"]["masks"]
    for i in range(1, images, 2):
        mask = np.zeros((CROP, CROP), dtype=bool)
        y, x = rng.integers(0, CROP - 48, 2)
        mask[y:y + 48, x:x + 48] = True
        masks[i] = mask
    group.attrs["complete"] = True
    stored = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    feature_files = sum(f.stat().st_size for f in (path / "train" / "features").rglob("*") if f.is_file())
    return {"stored_bytes": stored, "feature_bytes_stored": feature_files}


def child(task: str, store_path: str) -> None:
    """Run one task on the store and print its peak RSS in bytes."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    store = FeatureStore(store_path)
    raw = {"datasets": {"bench": {"format": "mvtec", "path": ".", "categories": ["x"]}}, "protocol_c": {"datasets": []},
           "protocol_a": {"datasets": {}}}
    params = parse_params(raw)
    params = replace(params, train=TrainConfig(epochs=1, batch_size=2, dtype="float32", stats_memory_mb=64),
                     score=ScoreConfig(metrics_memory_mb=0),
                     peers=PeersConfig(coreset_ratio=0.01, projection_dim=64, bank_limit=20_000))
    start = time.perf_counter()
    if task == "train":
        from polarocc.detector.stores import fit_store

        fit_store(store, params, 1.0, ("normal",))
    elif task == "score":
        from polarocc.analysis.polar import PolarAccumulator
        from polarocc.detector.stores import category_metrics, pixel_accumulators, score_store
        from polarocc.models.centers import make_center
        from polarocc.models.projector import Projector

        center = make_center("normal", 1.0, CHANNELS)
        pixel, polar = pixel_accumulators(store, 1, params.score), [PolarAccumulator(center)]
        [scores] = score_store(store, [(Projector(CHANNELS), center)], params.score, pixel=pixel, polar=polar)
        category_metrics(store, scores, pixel[0].result())
        polar[0].summary()
    else:
        from polarocc.pipeline.peers import peer_category

        peer_category(store, params, task)
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "seconds": round(seconds, 2)}))


def to_markdown(result: dict) -> str:
    """Peak RSS per task and scale."""
    lines = ["# Memory against image count", "", f"Machine: {result['machine']}. Features {CHANNELS} x {SIDE} x "
             f"{SIDE} float16 per image (Wide-ResNet50 layers 1-3 at 224 px), Gram statistics in float64; "
             "training reads Gram matrices from disk above `train.stats_memory_mb` (64 MB here).", "",
             "Each cell: peak RSS, wall time and throughput (images of the split the task reads per second).", "",
             "| allocator | images | stored bytes per image | compression | "
             + " | ".join(f"{t}" for t in TASKS) + " |", "|---|---|---|---|" + "---|" * len(TASKS)]
    for allocator in ALLOCATORS:
        for row in result["scales"]:
            cells = [f"{m['peak_rss_bytes'] / 2 ** 20:.0f} MiB, {m['seconds']} s "
                     f"({row['images'] / m['seconds']:.1f} img/s)" for m in (row[allocator][t] for t in TASKS)]
            lines.append(f"| {allocator} | {row['images']} | {row['stored_bytes_per_image'] / 1e6:.1f} MB | "
                         f"{row['feature_compression']:.3f} | " + " | ".join(cells) + " |")
    lines += ["", result["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=int, default=4)
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the last .json")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.markdown_only:  # re-render the table from the last results
        write_results("bench_memory", json.loads((REPORTS / "bench_memory.json").read_text()), to_markdown)
        return
    import platform

    import torch

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}", "scales": [],
              "note": "train: the Gram trainer (1 epoch, batch 2) with the radius certificate; score: one model over "
                      "the test split with every metric of the score stage (pixel metrics binned: "
                      "score.metrics_memory_mb = 0) and the polar diagnostics; padim and patchcore: fit on the "
                      "training split, then score the test split with the same metrics. PaDiM keeps a "
                      "per-position Gaussian over 100 random channels, accumulated batch by batch; PatchCore a "
                      "seeded sample of at most peers.bank_limit (20000 here) training vectors, then the 1% "
                      "coreset. Half of the test images are anomalous, each with a 48 x 48 px defect. With glibc's "
                      "default allocator RSS creeps up with the number of batches: after large frees glibc raises "
                      "its mmap threshold and keeps later large buffers in a heap it seldom returns. A fixed "
                      "MALLOC_MMAP_THRESHOLD_ shows what the code itself holds; set it for long runs."}
    raw_per_image = CHANNELS * SIDE * SIDE * 2
    for scale in args.scales:
        images = args.base * scale
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store.zarr"
            print(f"{images} images: writing the store ...", flush=True)
            sizes = make_store(store, images)
            row = {"images": images, "stored_bytes_per_image": sizes["stored_bytes"] / (2 * images),
                   "feature_compression": sizes["feature_bytes_stored"] / (raw_per_image * images)}
            for allocator, env in ALLOCATORS.items():
                for task in TASKS:
                    out = subprocess.run([sys.executable, __file__, "--child", task, str(store)], check=True,
                                         capture_output=True, text=True, env={**os.environ, **env}).stdout
                    row.setdefault(allocator, {})[task] = json.loads(out.strip().splitlines()[-1])
                    print(f"  {allocator} {task}: {row[allocator][task]}", flush=True)
            result["scales"].append(row)
    write_results("bench_memory", result, to_markdown)


if __name__ == "__main__":
    main()
