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

from polarocc.config import TrainConfig, load_params  # noqa: E402
from polarocc.data.images import Geometry  # noqa: E402
from polarocc.features import store as fs  # noqa: E402
from polarocc.features.extract import CategoryExtractor, extract_category, read_category  # noqa: E402
from polarocc.features.store import FeatureStore  # noqa: E402
from polarocc.models.backbone import build_extractor  # noqa: E402
from polarocc.models.centers import make_center  # noqa: E402
from polarocc.models.projector import Projector  # noqa: E402
from polarocc.pipeline import paths  # noqa: E402
from polarocc.pipeline.train import fit_store  # noqa: E402
from polarocc.training.direct import train_direct  # noqa: E402
from polarocc.training.gram import train_gram  # noqa: E402


def bench_extraction(params, category: str = "brick") -> dict:
    """Images/s of the full extraction against the raw backbone forward on the same batches."""
    b, e = params.backbone, params.extract
    extractor = build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)
    geometry = Geometry(b.resize, b.crop)
    samples = read_category(paths.dataset_root(params, "textures"), category)
    runner = CategoryExtractor(extractor, geometry, e.batch_size, e.dtype)
    images = runner.load(samples["train"])
    extractor(torch.from_numpy(images[: e.batch_size]))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), e.batch_size):
        extractor.raw_forward(torch.from_numpy(images[i:i + e.batch_size]))
    raw = len(images) / (time.perf_counter() - start)
    spec = extractor.spec(b.crop)
    layout = fs.StoreLayout(spec.channels, spec.height, spec.width, b.crop, e.dtype, e.shard_images, e.compressor,
                            e.level)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        extract_category(runner, {"train": samples["train"]}, layout, {"name": b.name}, Path(tmp) / "final.zarr",
                         Path(tmp) / "partial.zarr", progress=False)
        full = len(samples["train"]) / (time.perf_counter() - start)
        stored = sum(f.stat().st_size for f in (Path(tmp) / "final.zarr").rglob("*") if f.is_file())
    raw_bytes = len(images) * spec.channels * spec.height * spec.width * np.dtype(e.dtype).itemsize
    return {"category": category, "images": len(images), "raw_forward_images_per_s": round(raw, 2),
            "extraction_images_per_s": round(full, 2), "ratio": round(full / raw, 3),
            "feature_bytes_per_image": raw_bytes // len(images), "stored_bytes_per_image": stored // len(images),
            "note": "extraction = image decoding + forward + aggregation + Gram/sums + zarr write"}


def bench_training_default(params, category: str = "brick") -> dict:
    """Seconds per variant (one distribution, one category) for both trainers on the real cache."""
    store = FeatureStore(paths.feature_store(params, "textures", category))
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
    """Per-step times at the paper's 1792 channels on generated float16 features, scaled to a variant."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((images, channels, side, side), dtype=np.float32).astype(np.float16)
    flat = torch.from_numpy(features).to(torch.float64).flatten(2)
    gram = torch.bmm(flat, flat.transpose(1, 2)).float().numpy()
    sums = flat.sum(-1).float().numpy()
    del flat
    center = make_center("normal", 1.0, channels)
    steps_per_variant = 50 * -(-images // 16)

    def timed(fn, steps: int) -> float:
        cfg = TrainConfig(epochs=1, batch_size=16)
        start = time.perf_counter()
        done = 0
        while done < steps:
            fn(cfg)
            done += -(-images // 16)
        return (time.perf_counter() - start) / done

    gram_step = timed(lambda cfg: train_gram(Projector(channels, dtype=torch.float32), center, gram, sums,
                                             side * side, cfg), 10)
    direct_step = timed(lambda cfg: train_direct(Projector(channels), center,
                                                 lambda idx: features[np.sort(idx)], images, cfg), 2)
    return {"channels": channels, "images": images, "pixels_per_image": side * side,
            "steps_per_variant": steps_per_variant, "gram_s_per_step": round(gram_step, 4),
            "direct_s_per_step": round(direct_step, 3),
            "gram_s_per_variant": round(gram_step * steps_per_variant, 2),
            "direct_s_per_variant": round(direct_step * steps_per_variant, 1),
            "speedup": round(direct_step / gram_step, 1),
            "note": "measured per optimizer step (both float32: train.dtype float32) and multiplied by the steps of "
                    "a 50-epoch variant; the radius certificate is not included"}


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


def to_markdown(result: dict) -> str:
    """A short table of the headline numbers against their targets."""
    lines = ["# Benchmarks", "", f"Machine: {result['machine']}", "",
             "| measure | value | target |", "|---|---|---|"]
    ex = result.get("extraction")
    if ex:
        lines.append(f"| extraction vs raw forward ({ex['images']} images) | {ex['extraction_images_per_s']} vs "
                     f"{ex['raw_forward_images_per_s']} images/s = {ex['ratio']}x | >= 0.9x |")
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
    lines += ["", "Notes:"] + [f"- {k}: {v['note']}" for k, v in result.items() if isinstance(v, dict) and "note" in v]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-dvc", action="store_true", help="skip the cold pipeline and sweep timings")
    args = parser.parse_args()
    os.chdir(ROOT)
    torch.set_num_threads(os.cpu_count() or 1)
    params = load_params()
    result: dict = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                               f"torch {torch.__version__}"}
    print("extraction ...", flush=True)
    result["extraction"] = bench_extraction(params)
    print("training at the default channels ...", flush=True)
    result["training_default"] = bench_training_default(params)
    print("training at 1792 channels ...", flush=True)
    result["training_1792"] = bench_training_wide()
    if not args.skip_dvc:
        print("cold dvc repro and a new norm sweep ...", flush=True)
        result["dvc"] = bench_dvc()
    out = ROOT / "reports"
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "bench.md").write_text(to_markdown(result))
    print(to_markdown(result))


if __name__ == "__main__":
    main()
