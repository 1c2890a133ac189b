"""Benchmarks (not tests): extraction throughput, Gram vs direct training, cold and incremental `dvc repro`.

Run from the project root after `dvc repro` (it reads the textures dataset and its feature stores):

    python bench/run.py            # everything (about 10 minutes on 2 cores)
    python bench/run.py --skip-dvc # without the cold pipeline and sweep timings

Writes reports/bench.json and reports/bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reporting import write_results  # noqa: E402
from polarocc import layout  # noqa: E402
from polarocc.config import TrainConfig, load_params  # noqa: E402
from polarocc.detector.stores import fit_store  # noqa: E402
from polarocc.features import store as fs  # noqa: E402
from polarocc.features.extract import (  # noqa: E402
    CategoryExtractor,
    extract_category,
    gram_and_sums,
    read_category,
)
from polarocc.features.store import FeatureStore  # noqa: E402
from polarocc.models.backbone import build_extractor  # noqa: E402
from polarocc.models.centers import make_center  # noqa: E402
from polarocc.models.projector import Projector  # noqa: E402
from polarocc.training.direct import train_direct  # noqa: E402
from polarocc.training.gram import train_gram  # noqa: E402

BENCHES = ("extraction", "training_default", "training_1792", "dvc", "metrics", "cluster")


def bench_extraction(params, category: str = "brick", repeat: int = 3) -> dict:
    """Images/s of the full extraction of one category (train + test) against the raw backbone forward on the
    same batches, with the cost of each part of the extraction per shard.

    The extraction takes the extract stage's own path (``run_extract`` with the in-process scheduler): the store
    layout with ``train.statistics`` resolved as the stage resolves it, a CategoryExtractor on ``extract.device``,
    ``extract_category``. The raw forward and the extraction (in both statistics modes, the stage's first) run
    interleaved ``repeat`` times in this process, so that load from other processes hits them alike; the rates
    are medians and the ratio is the median over the repetitions of raw / extraction seconds."""
    from polarocc.device import pick_device
    from polarocc.features.budget import STORED, STREAMED, resolve_statistics

    b, e = params.backbone, params.extract
    extractor = build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)
    device = pick_device(e.device, "extract.device")
    geometry = b.geometry().resolve()
    samples = read_category(layout.dataset_root(params, "textures"), category)
    runner = CategoryExtractor(extractor, geometry, e.batch_size, e.dtype, device)
    everything = samples["train"] + samples["test"]
    spec = extractor.spec(geometry.size)
    stage_mode = resolve_statistics(params.train.statistics, spec.channels, spec.height, spec.width, e.dtype)
    modes = [stage_mode] + [m for m in (STORED, STREAMED) if m != stage_mode]
    layouts = {m: fs.StoreLayout(spec.channels, spec.height, spec.width, geometry.size[0], e.dtype, e.shard_images,
                                 e.compressor, e.level, stored_statistics=m == STORED) for m in modes}

    def seconds(fn, repeat: int = 3) -> float:
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        return (time.perf_counter() - start) / repeat

    def synchronized(fn):
        def run():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    images = runner.load(everything)
    batches = [torch.from_numpy(images[i:i + e.batch_size]).to(device) for i in range(0, len(images), e.batch_size)]
    raw_pass = synchronized(lambda: [extractor.raw_forward(x) for x in batches])
    raw_pass()  # warm-up
    extractor(batches[0])
    times: dict[str, list[float]] = {"raw": [], **{m: [] for m in modes}, "without_writing": []}
    writer = runner.write

    def without_writing(out: Path) -> float:
        """The same pipeline (decoding, both lanes, NaN/Inf-free shards settled in order) with a writer that
        only marks shards done: what the writer's CPU time (compression, Gram, zarr) costs on this machine."""
        group = fs.create_or_resume(out, "bench", layouts[stage_mode], samples, {})
        runner.write = lambda arrays, shard, *_: arrays["done"].__setitem__(shard, True)
        try:
            start = time.perf_counter()
            runner.run_splits(group, samples, progress=False)
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - start
        finally:
            runner.write = writer

    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            times["raw"].append(seconds(raw_pass, 1))
            times["without_writing"].append(without_writing(Path(tmp) / f"unwritten-{r}.zarr"))
            for m in modes:
                out = Path(tmp) / f"{m}-{r}"
                start = time.perf_counter()
                extract_category(runner, samples, layouts[m], {"name": b.name}, out / "final.zarr",
                                 out / "partial.zarr", progress=False)
                if device == "cuda":
                    torch.cuda.synchronize()
                times[m].append(time.perf_counter() - start)
                if not (m == stage_mode and r == repeat - 1):
                    shutil.rmtree(out)
        final = Path(tmp) / f"{stage_mode}-{repeat - 1}" / "final.zarr"
        stored = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())
        store = FeatureStore(final)
        shard = store.features("train")[: e.shard_images]
        items = samples["train"][: e.shard_images]
        shard_images = images[: e.shard_images]
        scratch = fs.create_or_resume(Path(tmp) / "scratch.zarr", "bench", layouts[stage_mode], {"train": items}, {})
        first = synchronized(lambda: extractor.raw_forward(torch.from_numpy(shard_images).to(device)))
        parts = {
            "decode": seconds(lambda: runner.load(items)),
            "raw_forward": seconds(first),
            "forward_and_aggregation": seconds(lambda: runner.features(shard_images)),
            "gram_and_sums_float64": seconds(lambda: gram_and_sums(shard)),
            f"write_train_shard_{stage_mode}": seconds(lambda: runner.write(scratch["train"], 0, len(items), items,
                                                                           shard)),
        }
    n = len(everything)
    raw = np.array(times["raw"])

    def rate(mode: str) -> float:
        return round(n / float(np.median(times[mode])), 2)

    def ratio(mode: str) -> float:
        return round(float(np.median(raw / np.array(times[mode]))), 3)

    raw_bytes = spec.channels * spec.height * spec.width * np.dtype(e.dtype).itemsize
    other = modes[1]
    return {"category": category, "images": n, "device": device, "repeat": repeat, "statistics": stage_mode,
            "raw_forward_images_per_s": rate("raw"), "extraction_images_per_s": rate(stage_mode),
            "ratio": ratio(stage_mode),
            f"extraction_{other}_images_per_s": rate(other), f"ratio_{other}": ratio(other),
            "ratio_without_writing": ratio("without_writing"),
            "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
            "seconds_per_shard": {k: round(v, 4) for k, v in parts.items()}, "shard_images": e.shard_images,
            "feature_bytes_per_image": raw_bytes, "stored_bytes_per_image": stored // n,
            "note": f"extraction = extract_category as the extract stage runs it (train.statistics "
                    f"{params.train.statistics} -> {stage_mode}): image decoding (a reader thread, shards ahead) + "
                    "forward + aggregation written in the store dtype (two shards at once on a CPU, each with all "
                    "the torch threads), one pipeline across the splits + NaN/Inf check, zarr write, Gram/sums "
                    "(train) or masks (test) in a writer thread; raw forward (one batch after another) and "
                    f"extraction interleaved {repeat} times: median rates, median of the paired ratios; "
                    "ratio_without_writing: the same pipeline with a writer that only marks shards done"}


def bench_training_default(params, category: str = "brick") -> dict:
    """Seconds per variant (one distribution, one category) for both trainers on the real cache."""
    store = FeatureStore(layout.feature_store(params, "textures", category))
    cfg = params.train
    start = time.perf_counter()
    fit_store(store, params, 1.0, ("normal",))
    gram_s = time.perf_counter() - start
    features = store.features("train")[:]
    center = make_center("normal", 1.0, store.channels, params.center.seed)
    projector = Projector(store.channels, seed=cfg.seed)
    start = time.perf_counter()
    train_direct(projector, center, lambda idx: features[np.sort(idx)], len(features), cfg)
    direct_s = time.perf_counter() - start
    return {"channels": store.channels, "images": len(features), "epochs": cfg.epochs,
            "gram_s_per_variant": round(gram_s, 3), "direct_s_per_variant": round(direct_s, 3),
            "speedup": round(direct_s / gram_s, 1),
            "note": "gram includes loading the statistics and the radius certificate over all training pixels; "
                    "direct reads features from memory (float32 compute)"}


def bench_training_wide(channels: int = 1792, images: int = 32, side: int = 56) -> dict:
    """Seconds per variant at the paper's 1792 channels on generated float16 features."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((images, channels, side, side), dtype=np.float32).astype(np.float16)
    flat = torch.from_numpy(features).to(torch.float64).flatten(2)
    gram = torch.bmm(flat, flat.transpose(1, 2)).float().numpy()
    sums = flat.sum(-1).float().numpy()
    del flat
    center = make_center("normal", 1.0, channels)
    steps_per_variant = 50 * -(-images // 16)

    start = time.perf_counter()
    history = train_gram(Projector(channels, dtype=torch.float32), center, gram, sums, side * side,
                         TrainConfig(epochs=50, batch_size=16))
    gram_variant = time.perf_counter() - start
    gram_step = gram_variant / history.steps
    # A direct variant takes many minutes here: time one epoch and scale it to 50.
    start = time.perf_counter()
    history = train_direct(Projector(channels), center, lambda idx: features[np.sort(idx)], images,
                           TrainConfig(epochs=1, batch_size=16))
    direct_step = (time.perf_counter() - start) / history.steps
    return {"channels": channels, "images": images, "pixels_per_image": side * side,
            "steps_per_variant": steps_per_variant, "gram_s_per_step": round(gram_step, 4),
            "direct_s_per_step": round(direct_step, 3),
            "gram_s_per_variant": round(gram_variant, 2),
            "direct_s_per_variant": round(direct_step * steps_per_variant, 1),
            "speedup": round(direct_step / gram_step, 1),
            "note": "both float32 (train.dtype float32); gram: a whole 50-epoch variant; direct: one epoch timed and "
                    "scaled to 50; the radius certificate is not included"}


def bench_dvc() -> dict:
    """Wall time of a cold `dvc repro` in a fresh clone and of a new norm sweep there."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        start = time.perf_counter()
        subprocess.run(["dvc", "repro", "-q"], cwd=clone, check=True, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        out = subprocess.run(["dvc", "exp", "run", "-S", "sweep.norms=[1,3]"], cwd=clone, check=True, env=env,
                             capture_output=True, text=True).stdout
        sweep = time.perf_counter() - start
        ran = sorted({line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")})
        shutil.rmtree(clone / ".dvc" / "cache", ignore_errors=True)
    return {"cold_repro_s": round(cold, 1), "new_norm_sweep_s": round(sweep, 1), "sweep_stages_run": ran,
            "note": "cold: fresh git clone, empty DVC cache, converted Lite0 weights already in the user cache"}


def bench_cluster(params, category: str = "brick", workers: int = 2) -> dict:
    """One category's extraction in-process against a ``workers``-process dask LocalCluster (cluster start-up
    and the workers' backbone builds timed apart from the extraction itself)."""
    from polarocc.features.distributed import WorkerSpec, extract_category_distributed, make_client

    b, e = params.backbone, params.extract
    extractor = build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)
    geometry = b.geometry().resolve()
    spec = extractor.spec(geometry.size)
    store_layout = fs.StoreLayout(spec.channels, spec.height, spec.width, geometry.size[0], e.dtype, e.shard_images,
                                  e.compressor, e.level)
    samples = read_category(layout.dataset_root(params, "textures"), category, check=False, progress=False)
    count = sum(len(v) for v in samples.values())
    backbone = {"name": b.name}
    with tempfile.TemporaryDirectory() as tmp:
        runner = CategoryExtractor(extractor, geometry, e.batch_size, e.dtype)
        start = time.perf_counter()
        extract_category(runner, samples, store_layout, backbone, Path(tmp) / "a.zarr", Path(tmp) / "pa.zarr",
                         progress=False)
        inprocess = time.perf_counter() - start
        threads = max(1, (os.cpu_count() or 1) // workers)
        worker_spec = WorkerSpec(b.name, tuple(b.layers), b.pool, b.weights, spec.mean, spec.std, geometry.record(),
                                 e.batch_size, e.dtype, "cpu")
        start = time.perf_counter()
        client = make_client("local", workers, threads)
        from polarocc.features.distributed import worker_runner

        client.run(worker_runner, worker_spec)  # build each worker's backbone before timing
        startup = time.perf_counter() - start
        start = time.perf_counter()
        extract_category_distributed(client, worker_spec, samples, store_layout, backbone, Path(tmp) / "b.zarr",
                                     Path(tmp) / "pb.zarr", progress=False)
        cluster = time.perf_counter() - start
        local_cluster = client.cluster
        client.close()
        local_cluster.close()
    return {"images": count, "inprocess_images_per_s": round(count / inprocess, 2),
            "cluster_images_per_s": round(count / cluster, 2), "workers": workers,
            "threads_per_worker": threads, "cluster_startup_s": round(startup, 1),
            "note": "workers x threads_per_worker = the machine's cores; start-up includes each worker "
                    "building the backbone once"}


def bench_metrics(images: int = 100, side: int = 224, repeat: int = 5) -> dict:
    """AUPRO and pixel F1-max on ``images`` random masks of side x side (median of ``repeat`` runs)."""
    from polarocc.scoring.metrics import aupro, connected_regions, f1_max

    rng = np.random.default_rng(0)
    masks = np.zeros((images, side, side), dtype=bool)
    for i in range(images // 2):  # half the images hold one to three rectangular defects
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, side - 40, 2)
            masks[i, y:y + rng.integers(5, 40), x:x + rng.integers(5, 40)] = True
    maps = (rng.random(masks.shape) + masks * 0.5).astype(np.float32)

    def median_seconds(fn) -> float:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    return {"images": images, "side": side, "aupro_s": round(median_seconds(lambda: aupro(masks, maps)), 3),
            "aupro_given_regions_s": round(median_seconds(
                lambda: aupro(masks, maps, regions=connected_regions(masks))), 3),
            "pixel_f1_max_s": round(median_seconds(lambda: f1_max(masks, maps)), 3),
            "note": "AUPRO: connected components, a partial selection of the FPR-0.3 score and one sort of the "
                    "pixels above it; F1-max: one sort of every pixel"}


def to_markdown(result: dict) -> str:
    """A short table of the headline numbers against their targets."""
    lines = ["# Benchmarks", "", f"Machine: {result['machine']}", "",
             "| measure | value | target |", "|---|---|---|"]
    ex = result.get("extraction")
    if ex:
        lines.append(f"| extraction vs raw forward ({ex['images']} images) | {ex['extraction_images_per_s']} vs "
                     f"{ex['raw_forward_images_per_s']} images/s = {ex['ratio']}x | >= 0.9x |")
        parts = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in ex["seconds_per_shard"].items())
        lines.append(f"| extraction cost per shard of {ex['shard_images']} images | {parts} | |")
        if "ratio_without_writing" in ex:
            other = next(k for k in ex if k.startswith("ratio_") and k != "ratio_without_writing")
            lines.append(f"| extraction ratio with {other.removeprefix('ratio_')} statistics; with a writer that only "
                         f"marks shards done | {ex[other]}x; {ex['ratio_without_writing']}x | |")
        lines.append(f"| feature cache per image (raw -> stored) | {ex['feature_bytes_per_image'] / 1e6:.2f} MB -> "
                     f"{ex['stored_bytes_per_image'] / 1e6:.2f} MB | |")
    for key, target in (("training_default", ">= 20x"), ("training_1792", ">= 50x")):
        tr = result.get(key)
        if tr:
            lines.append(f"| Gram vs direct per variant, {tr['channels']} channels | {tr['gram_s_per_variant']} s vs "
                         f"{tr['direct_s_per_variant']} s = {tr['speedup']}x | {target} |")
    dv = result.get("dvc")
    if dv:
        lines.append(f"| cold `dvc repro` | {dv['cold_repro_s']} s | about 300 s |")
        lines.append(f"| new norm sweep `dvc exp run -S sweep.norms=[1,3]` | {dv['new_norm_sweep_s']} s "
                     f"(stages: {', '.join(dv['sweep_stages_run'])}) | <= 30 s, no extraction |")
    me = result.get("metrics")
    if me:
        lines.append(f"| AUPRO (FPR <= 0.3), {me['images']} masks of {me['side']}x{me['side']} | {me['aupro_s']} s "
                     f"| <= 1 s |")
        lines.append(f"| pixel F1-max, same maps | {me['pixel_f1_max_s']} s | |")
    cl = result.get("cluster")
    if cl:
        lines.append(f"| extraction in-process vs {cl['workers']}-worker LocalCluster ({cl['images']} images) | "
                     f"{cl['inprocess_images_per_s']} vs {cl['cluster_images_per_s']} "
                     f"images/s (+{cl['cluster_startup_s']} s start-up) | |")
    lines += ["", "Notes:"] + [f"- {k}: {v['note']}" for k, v in result.items() if isinstance(v, dict) and "note" in v]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-dvc", action="store_true", help="skip the cold pipeline and sweep timings")
    parser.add_argument("--only", choices=BENCHES, action="append",
                        help="run only these benchmarks; the others keep their last results in reports/bench.json")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params()
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"torch {torch.__version__}"}
    previous = ROOT / "reports" / "bench.json"
    if previous.is_file():  # keep the last results of benchmarks not run now
        last = json.loads(previous.read_text())
        result.update({k: v for k, v in last.items() if k in BENCHES})
    chosen = args.only or [b for b in BENCHES if not (args.skip_dvc and b == "dvc")]
    runs = {"extraction": lambda: bench_extraction(params), "training_default": lambda: bench_training_default(params),
            "training_1792": bench_training_wide, "dvc": bench_dvc, "metrics": bench_metrics,
            "cluster": lambda: bench_cluster(params)}
    for name in chosen:
        print(f"{name} ...", flush=True)
        result[name] = runs[name]()
    write_results("bench", result, to_markdown)


if __name__ == "__main__":
    main()
