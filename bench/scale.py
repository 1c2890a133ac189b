"""Disk, peak memory and time of the real extract, train and score stages against the training-set size.

For each training-set size N (default 32, 128, 512), backbone (Wide-ResNet50 layers 1-3 with seeded random
weights, 1792 channels at 56 x 56; EfficientNet-Lite0 with the packaged ImageNet weights, 176 channels) and
``train.statistics`` mode (stored, streamed), the script builds a throw-away project whose params are the
project's params.yaml with the dataset, backbone and statistics mode replaced, generates an MVTec-layout category
of N training and N/4 test images from the embedded texture photos (with defect masks), and runs the stage
functions ``run_extract``, ``run_train`` and ``run_score`` each in a fresh process (peak RSS from getrusage).

Measured per row: bytes of the store's arrays per image (features, per-image statistics, what DVC's cache adds
given the project's ``.dvc/config`` cache.type), peak RSS per stage and seconds per stage. Training runs for
``--epochs`` (default 1) and is extrapolated to ``train.epochs`` of params.yaml (50). From the per-image costs
and the published image counts it projects the disk and memory of MVTec AD and VisA at ``train.statistics: auto``.

    python bench/scale.py                                    # the full benchmark (see --help for the defaults)
    python bench/scale.py --sizes 4,8 --epochs 1 --out /tmp  # a smoke run

Writes ``<out>/bench_scale.json`` and ``<out>/bench_scale.md`` (atomically, after every row). Backbone weights
``random`` are for this benchmark only: their features are not pretrained and the AUROCs mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from io import StringIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polarocc import layout  # noqa: E402
from polarocc.atomic import write_json, write_text  # noqa: E402
from polarocc.config import load_params, read_yaml  # noqa: E402
from polarocc.features.budget import (  # noqa: E402
    AUTO,
    STORED,
    STREAMED,
    feature_bytes_per_image,
    folder_bytes,
    free_bytes,
    human_bytes,
    nearest_existing,
    resolve_statistics,
)

BACKBONE_WEIGHTS = {"wide_resnet50_2": "random", "tf_efficientnet_lite0": "package"}
DATASET, CATEGORY, NORM = "bench", "brick", 1.0
# Published image counts (train, test, categories).
PUBLISHED = {"MVTec AD": (3629, 1725, 15), "VisA": (8659, 2162, 12)}
DISK_GB, RAM_GB = 64, 128  # the machine the projection must fit (MVTec AD with Wide-ResNet50)
TARGET_BYTES_PER_TRAIN_IMAGE = 12e6  # 1792 channels, train.statistics auto
TARGET_RSS_RATIO = 1.2  # peak RSS of train and score at the largest size over that at the smallest
ARRAYS = ("train/features", "test/features", "train/gram", "train/sums", "test/masks")
RESULT_MARK = "BENCH_SCALE_RESULT "
# Left out by default to keep the full run short on 2 cores: stored 1792-channel statistics at 128 and 512 images
# would add about 35 minutes (extraction with per-image float64 Gram matrices, 13 GB of them read back from disk
# at 512) and 20 GB of disk; their bytes per image are measured at 32. The streamed 1792-channel rows (the auto
# mode) keep every size. `--skip none` runs everything.
DEFAULT_SKIP = "wide_resnet50_2:stored:128,wide_resnet50_2:stored:512"
# Memory budgets: "project" keeps params.yaml's train.stats_memory_mb and score.metrics_memory_mb, which let
# stored statistics and exact pixel metrics grow with the data up to them; "1" (MB) bounds both (statistics read
# from disk a batch at a time, binned pixel metrics), which shows what the stages hold regardless of the data.
PROJECT_BUDGET = "project"
MIB, GIB = 2 ** 20, 2 ** 30


# ---------------------------------------------------------------------------------------------------- child


def child(stage: str, project: Path) -> None:
    """Run one stage on the project in this (fresh) process; print its seconds and peak RSS as a marked line."""
    from polarocc.errors import PolaroccError

    extra: dict[str, Any] = {}
    try:
        params = load_params(project / "params.yaml")
        if stage == "extract":
            from polarocc.pipeline.extract import run_extract

            start = time.perf_counter()
            run_extract(params, DATASET, progress=True, check_files=False)  # as stages/extract.py after `check`
        elif stage == "train":
            import polarocc.pipeline.train as train_stage
            import polarocc.training.fit as fitting  # where the train stage's lockstep runs

            loop = [0.0]
            lockstep = fitting.train_lockstep

            def timed(*args: Any, **kwargs: Any) -> Any:  # the epochs alone, to extrapolate to more of them
                began = time.perf_counter()
                try:
                    return lockstep(*args, **kwargs)
                finally:
                    loop[0] += time.perf_counter() - began

            fitting.train_lockstep = timed
            start = time.perf_counter()
            histories = train_stage.run_train(params, NORM, progress=True)
            fits = [h[DATASET][CATEGORY] for h in histories.values()]
            models = [layout.model_file(params, NORM, d, DATASET, CATEGORY) for d in params.sweep.distributions]
            extra = {"epoch_loop_seconds": loop[0], "trainers": sorted({h["trainer"] for h in fits}),
                     "notes": sorted({n for h in fits for n in h["notes"] if not n.startswith("every training")}),
                     "model_bytes": sum(m.stat().st_size for m in models) / len(models)}
        elif stage == "score":
            from polarocc.pipeline.score import run_score

            start = time.perf_counter()
            results = run_score(params, NORM, progress=True)
            extra = {"image_auroc": {d: r[DATASET][CATEGORY]["image_auroc"] for d, r in results.items()}}
        else:
            raise SystemExit(f"unknown stage {stage!r}")
    except PolaroccError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(RESULT_MARK + json.dumps({"seconds": seconds, "peak_rss_bytes": peak, **extra}), flush=True)


class StageFailed(RuntimeError):
    """A stage process exited with an error; ``message`` is its last error line (or the tail of its output)."""

    def __init__(self, stage: str, code: int, message: str) -> None:
        super().__init__(f"{stage} exited with {code}: {message}")
        self.stage, self.code, self.message = stage, code, message


def run_child(stage: str, project: Path, env: dict[str, str]) -> dict:
    """Run ``stage`` in a fresh Python process; its progress bars pass through to stderr."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--project", str(project)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=project, env=env)
    tail: deque[bytes] = deque(maxlen=64)

    def relay() -> None:
        for chunk in iter(lambda: proc.stderr.read1(8192), b""):
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()
            tail.append(chunk)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        out = proc.stdout.read().decode("utf-8", "replace")
        code = proc.wait()
    except BaseException:  # interrupted: stop the stage before its project folder is removed
        proc.kill()
        proc.wait()
        raise
    reader.join()
    if code != 0:
        text = b"".join(tail).decode("utf-8", "replace").replace("\r", "\n")
        errors = [line for line in text.splitlines() if line.startswith("error:") or "Error" in line]
        raise StageFailed(stage, code, (errors or text.strip().splitlines() or ["no output"])[-1])
    lines = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if not lines:
        raise StageFailed(stage, code, "no result line on stdout")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ---------------------------------------------------------------------------------------------------- setup


def test_count(n_train: int) -> int:
    """A quarter as many test images (at least 2: one good, one defective)."""
    return max(2, n_train // 4)


def make_dataset(root: Path, n_train: int, seed: int) -> tuple[int, int]:
    """One MVTec-layout category of the embedded textures: ``n_train`` train/good images and a quarter as many
    test images, half of them with a synthetic defect and its mask. Returns (train, test) counts."""
    from polarocc.config import DEFECT_TYPES
    from polarocc.data.textures import TextureSpec, check_spec, make_category

    n_test = test_count(n_train)
    defective = n_test // 2
    # Area defects first: with a single defective image, a thin scratch can cover no feature position at all,
    # and the score stage's polar diagnostics need some anomalous positions.
    ordered = sorted(DEFECT_TYPES, key=lambda kind: kind == "scratch")
    types = tuple(ordered[:max(1, min(len(ordered), defective))])
    per_type = max(1, defective // len(types))
    good = max(1, n_test - per_type * len(types))
    spec = TextureSpec(train=n_train, test_good=good, defects_per_type=per_type, defect_types=types, crop=200,
                       image_size=256)
    check_spec((CATEGORY,), spec.crop)
    counts = make_category(root, CATEGORY, spec, seed)
    return counts["train"], counts["test_good"] + counts["test_defective"]


def dump_yaml(raw: dict) -> str:
    from ruamel.yaml import YAML

    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    buffer = StringIO()
    yaml.dump(raw, buffer)
    return buffer.getvalue()


def project_params(base: dict, data: Path, backbone: str, statistics: str, epochs: int,
                   distributions: list[str], budget: str = PROJECT_BUDGET) -> dict:
    """The project's params with one dataset (the generated category), the backbone, the statistics mode, the
    epochs and one norm; Protocol A and C off. Everything else (extract, train, score settings) is kept, and the
    memory budgets too unless ``budget`` gives MB for both train.stats_memory_mb and score.metrics_memory_mb."""
    raw = copy.deepcopy(base)
    raw["datasets"] = {DATASET: {"format": "mvtec", "path": str(data), "categories": [CATEGORY]}}
    raw.setdefault("backbone", {}).update(name=backbone, weights=BACKBONE_WEIGHTS.get(backbone, "package"),
                                          layers=[1, 2, 3], resize=256, crop=224)
    raw.setdefault("extract", {}).update(scheduler="inprocess")
    raw.setdefault("train", {}).update(epochs=epochs, statistics=statistics)
    if budget != PROJECT_BUDGET:
        raw["train"]["stats_memory_mb"] = int(budget)
        raw.setdefault("score", {})["metrics_memory_mb"] = int(budget)
    raw["sweep"] = {**raw.get("sweep", {}), "norms": [NORM], "distributions": distributions}
    raw.setdefault("center", {}).update(norm=NORM, distribution=distributions[0])
    raw.setdefault("protocol_a", {})["datasets"] = {}
    raw.setdefault("protocol_c", {})["datasets"] = []
    return raw


def machine() -> dict:
    import torch

    from polarocc.device import pick_device
    from polarocc.planning import total_memory

    model = platform.processor()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return {"cpu_count": os.cpu_count(), "cpu_model": model, "ram_gb": round(total_memory() / GIB, 1),
            "torch": torch.__version__, "device": pick_device("auto"), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}


def dvc_cache(root: Path) -> dict:
    """The cache link DVC uses for the project's feature stores, and whether it adds a copy of their bytes."""
    from polarocc.planning import LINK_TYPES, NO_PROJECT, dvc_cache_link

    link, types, note = dvc_cache_link(root, nearest_existing(root / layout.FEATURES))
    return {"link": link, "types": types, "note": note, "adds_copy": link not in (*LINK_TYPES, NO_PROJECT)}


# ---------------------------------------------------------------------------------------------------- rows


def measure_row(project: Path, backbone: str, statistics: str, n_train: int, n_test: int, epochs: int,
                distributions: list[str], full_epochs: int, copy_cache: bool, env: dict[str, str],
                budget: str = PROJECT_BUDGET) -> dict:
    """Extract, train and score one project, each in a fresh process; the row of the report."""
    from polarocc.features.store import FeatureStore

    began = time.perf_counter()
    params = load_params(project / "params.yaml")
    variants = len(distributions)
    stage: dict[str, dict] = {}
    for name in ("extract", "train", "score"):
        print(f"    {name} ...", file=sys.stderr, flush=True)
        stage[name] = run_child(name, project, env)
        print(f"    {name}: {stage[name]['seconds']:.1f} s, peak RSS "
              f"{stage[name]['peak_rss_bytes'] / MIB:.0f} MiB", file=sys.stderr, flush=True)
        if name == "extract":
            path = layout.feature_store(params, DATASET, CATEGORY)
            arrays = {a: folder_bytes(path / a) for a in ARRAYS}
            arrays["other"] = folder_bytes(path) - sum(arrays.values())
            channels, height, width = FeatureStore(path).features("train").shape[1:]
    features = (arrays["train/features"] + arrays["test/features"]) / (n_train + n_test)
    stats = (arrays["train/gram"] + arrays["train/sums"]) / n_train
    cache = features + stats if copy_cache else 0.0
    t = stage["train"]
    per_epoch = t["epoch_loop_seconds"] / epochs
    fixed = max(t["seconds"] - t["epoch_loop_seconds"], 0.0)
    return {
        "backbone": backbone, "channels": int(channels), "statistics": statistics,
        "train_images": n_train, "test_images": n_test,
        "bytes_per_train_image": {"features": features, "statistics": stats, "dvc_cache": cache,
                                  "total": features + stats + cache},
        "peak_rss_mb": {s: stage[s]["peak_rss_bytes"] / MIB for s in ("extract", "train", "score")},
        "seconds": {"extract": stage["extract"]["seconds"], "train_per_variant": t["seconds"] / variants,
                    "score_per_variant": stage["score"]["seconds"] / variants,
                    "train_per_epoch_per_variant": per_epoch / variants,
                    "train_per_variant_extrapolated": (fixed + full_epochs * per_epoch) / variants},
        # extra keys
        "weights": BACKBONE_WEIGHTS.get(backbone, "package"), "feature_shape": [int(channels), int(height),
                                                                               int(width)],
        "auto_statistics": resolve_statistics(AUTO, int(channels), int(height), int(width)) == statistics,
        "epochs": epochs, "extrapolated_epochs": full_epochs, "variants": variants, "distributions": distributions,
        "memory_budget": budget, "memory_budgets_mb": {"train.stats_memory_mb": params.train.stats_memory_mb,
                                                       "score.metrics_memory_mb": params.score.metrics_memory_mb},
        "bytes_per_test_image": {"features": features, "masks": arrays["test/masks"] / n_test},
        "features_bytes_uncompressed_per_image": feature_bytes_per_image(int(channels), int(height), int(width),
                                                                         params.extract.dtype),
        "store_bytes": arrays, "model_bytes_per_variant": t["model_bytes"],
        "trainers": t["trainers"], "train_notes": t["notes"], "image_auroc": stage["score"]["image_auroc"],
        "row_wall_seconds": time.perf_counter() - began,  # three process starts and the measurements included
    }


def needed_bytes(channels: int, height: int, width: int, statistics: str, n_train: int, n_test: int) -> int:
    """Uncompressed store arrays of a row, as the extract stage's own disk check counts them."""
    from polarocc.features.budget import store_bytes
    from polarocc.features.store import StoreLayout

    layout = StoreLayout(channels, height, width, 224, "float16", 16, "lz4", 5, stored_statistics=statistics == STORED)
    return store_bytes(layout, n_train, n_test).total


# ---------------------------------------------------------------------------------------------------- report


def planned_memory(base: dict, row: dict, distributions: list[str], n_train: int, n_test: int) -> dict[str, int]:
    """The planner's peak-memory estimate per stage (:mod:`polarocc.planning`) for ``row``'s backbone and
    statistics mode at ``n_train``/``n_test`` images with ``distributions`` trained in lockstep."""
    from polarocc.config import parse_params
    from polarocc.planning import BackboneShape, extract_memory, protocol_b_layout, score_memory, train_memory

    raw = project_params(base, Path("unused"), row["backbone"], row["statistics"], row["epochs"], distributions,
                         row.get("memory_budget", PROJECT_BUDGET))
    params = parse_params(raw)
    c, h, w = row["feature_shape"]
    shape = BackboneShape(row["backbone"], row["weights"], [1, 2, 3], (224, 224), c, h, w, 0, 0)  # sizes cancel out
    layout = protocol_b_layout(params, shape)
    return {"extract": extract_memory(params, shape, layout), "train": train_memory(params, shape, layout, n_train),
            "score": score_memory(params, shape, n_test)}


def projection(rows: list[dict], copy_cache: bool, base: dict) -> list[dict]:
    """Disk and peak memory of MVTec AD and VisA per backbone at ``train.statistics: auto``, from measured costs.

    Disk: the per-image bytes measured at the largest size times the published counts. Peak RSS: measured at the
    largest size, plus what the planner's estimate adds from there to the whole dataset's count (the stages hold
    at most a few shards of features; what grows with the count is bounded by train.stats_memory_mb and
    score.metrics_memory_mb) and to the default sweep's lockstep variants."""
    sweep = base.get("sweep", {})
    distributions = list(sweep.get("distributions", ["normal"]))
    default_variants = len(distributions) * len(sweep.get("norms", [NORM]))
    out = []
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        mine = [r for r in rows if r["backbone"] == backbone and r["auto_statistics"]]
        if any(r.get("memory_budget", PROJECT_BUDGET) == PROJECT_BUDGET for r in mine):
            mine = [r for r in mine if r.get("memory_budget", PROJECT_BUDGET) == PROJECT_BUDGET]
        if not mine:
            continue
        ref = max(mine, key=lambda r: r["train_images"])
        b, t = ref["bytes_per_train_image"], ref["bytes_per_test_image"]
        measured = planned_memory(base, ref, ref.get("distributions", ["normal"]), ref["train_images"],
                                  ref["test_images"])
        for dataset, (n_train, n_test, categories) in PUBLISHED.items():
            stores = n_train * (b["features"] + b["statistics"]) + n_test * (t["features"] + t["masks"])
            raw = ref.get("features_bytes_uncompressed_per_image", b["features"])
            stores_raw = stores + (n_train + n_test) * (raw - b["features"])
            per_model = ref["model_bytes_per_variant"]
            paper_models = categories * 2 * per_model  # the paper's run: one center per category, and its export
            sweep_models = categories * (default_variants + 1) * per_model  # the default sweep + export
            factor = 2 if copy_cache else 1
            planned = planned_memory(base, ref, distributions, n_train, n_test)
            by_stage = {s: ref["peak_rss_mb"][s] * MIB + max(planned[s] - measured[s], 0) for s in planned}
            # Pretrained features barely compress (Lite0: 1.10 -> 1.08 MB per image); random weights' features
            # compress better, so the disk that decides "fits" counts the features uncompressed.
            disk = (stores_raw + paper_models) * factor / 1e9
            peak = max(by_stage.values()) / GIB
            out.append({"dataset": dataset, "backbone": backbone, "disk_gb": round(disk, 2),
                        "peak_rss_gb": round(peak, 2),
                        # extra keys
                        "statistics": ref["statistics"], "train_images": n_train, "test_images": n_test,
                        "categories": categories, "measured_at_train_images": ref["train_images"],
                        "disk_gb_counts": "features uncompressed + one center variant's models per category",
                        "disk_gb_with_measured_compression": round((stores + paper_models) * factor / 1e9, 2),
                        "models_gb_default_sweep": round(sweep_models * factor / 1e9, 2),
                        "disk_gb_default_sweep": round((stores_raw + sweep_models) * factor / 1e9, 2),
                        "peak_rss_gb_by_stage": {k: round(v / GIB, 2) for k, v in by_stage.items()},
                        "fits": disk <= DISK_GB and peak <= RAM_GB})
    return out


def targets(result: dict) -> list[tuple[str, bool | None, str]]:
    """(target, PASS/FAIL or None when not measured, detail)."""
    rows, checks = result["rows"], []
    wide = [r for r in rows if r["channels"] == 1792 and r["auto_statistics"]]
    worst = max(wide, key=lambda r: r["bytes_per_train_image"]["total"], default=None)
    if worst is None:
        detail = "not measured"
    else:
        b = worst["bytes_per_train_image"]
        raw = worst.get("features_bytes_uncompressed_per_image", b["features"])
        detail = (f"largest {b['total'] / 1e6:.2f} MB (features {b['features'] / 1e6:.2f} MB on disk, "
                  f"{raw / 1e6:.2f} MB uncompressed; dvc cache {result['dvc_cache']['link']}: "
                  f"{'adds a copy' if result['dvc_cache']['adds_copy'] else 'adds nothing'})")
    checks.append(("1792 channels, statistics auto (streamed): total disk per training image <= 12 MB",
                   None if worst is None else worst["bytes_per_train_image"]["total"] <= TARGET_BYTES_PER_TRAIN_IMAGE,
                   detail))
    sizes = sorted({r["train_images"] for r in rows})
    stated = "" if sizes[:1] == [32] and sizes[-1:] == [512] else \
        " (the target is stated for 512 vs 32 images; here the largest vs the smallest measured size)"
    for budget in dict.fromkeys(r.get("memory_budget", PROJECT_BUDGET) for r in rows):
        details, ok = [], []
        for key in dict.fromkeys((r["backbone"], r["statistics"]) for r in rows):
            mine = sorted((r for r in rows if (r["backbone"], r["statistics"]) == key
                           and r.get("memory_budget", PROJECT_BUDGET) == budget), key=lambda r: r["train_images"])
            if len(mine) < 2:
                continue
            small, large = mine[0], mine[-1]
            ratios = {s: large["peak_rss_mb"][s] / small["peak_rss_mb"][s] for s in ("train", "score")}
            ok.append(all(v <= TARGET_RSS_RATIO for v in ratios.values()))
            details.append(f"{key[0]} {key[1]} {large['train_images']} vs {small['train_images']}: train "
                           f"{ratios['train']:.2f}x, score {ratios['score']:.2f}x")
        budgets = ("the project's memory budgets (stored statistics and exact pixel metrics grow with the data up "
                   "to train.stats_memory_mb and score.metrics_memory_mb)" if budget == PROJECT_BUDGET else
                   f"memory budgets of {budget} MB (statistics from disk, binned pixel metrics)")
        checks.append((f"peak RSS of train and score at 512 images <= {TARGET_RSS_RATIO}x that at 32{stated}, "
                       f"with {budgets}", all(ok) if ok else None,
                       "; ".join(details) or "fewer than two sizes measured"))
    mvtec = [p for p in result["projection"] if p["dataset"] == "MVTec AD" and p["backbone"] == "wide_resnet50_2"]
    checks.append((f"projection: MVTec AD with Wide-ResNet50 fits {DISK_GB} GB of disk and {RAM_GB} GB of RAM",
                   mvtec[0]["fits"] if mvtec else None,
                   f"{mvtec[0]['disk_gb']:.1f} GB disk (features uncompressed, one center variant), "
                   f"{mvtec[0]['peak_rss_gb']:.1f} GiB peak RSS; the default 28-variant sweep's projectors make it "
                   f"{mvtec[0]['disk_gb_default_sweep']:.1f} GB" if mvtec
                   else "Wide-ResNet50 at statistics auto not measured"))
    return checks


def _sec(x: float) -> str:
    return f"{x:.2f}" if x < 10 else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def _budget_label(entry: dict) -> str:
    budget = entry.get("memory_budget", PROJECT_BUDGET)
    return "" if budget == PROJECT_BUDGET else f", budgets {budget} MB"


def to_markdown(result: dict) -> str:
    m, c = result["machine"], result["dvc_cache"]
    e, full = result["epochs"], result["extrapolated_epochs"]
    lines = [
        "# Scale: disk, peak memory and time against the number of training images", "",
        f"Machine: {m['cpu_count']} CPU cores ({m['cpu_model']}), {m['ram_gb']} GiB RAM, torch {m['torch']}, "
        f"device {m['device']}; load average at start {m['load_average_at_start']}. "
        f"{'Run complete.' if result['complete'] else '**Partial results: the run is still going or stopped.**'}",
        "",
        "The real stage functions (`run_extract`, `run_train`, `run_score`), each in a fresh process, on one "
        "generated texture category of N training and N/4 test images (half of them defective, with masks). "
        f"Training runs **{e} epoch(s)** (`\"epochs\": {e}` in the JSON) and is extrapolated to {full} epochs "
        f"(the fixed part, the radius certificate and saving, plus {full} x the measured epoch time). "
        f"{result['variants']} center variant(s) per stage; the train@norm stage trains every distribution of the "
        "sweep in lockstep on the same batch statistics, so per variant it costs less there. "
        f"DVC cache: cache.type {','.join(c['types']) or '-'} -> {c['link']} "
        f"({'adds a copy of every store' if c['adds_copy'] else 'adds no bytes'}). "
        "Bytes are on disk (decimal MB); peak RSS in MiB.", "",
        "| backbone | C | statistics | train | test | features MB/img | statistics MB/img | dvc cache MB/img | "
        "total MB/img | peak RSS extract / train / score MiB | extract s | train s/variant | train s/epoch | "
        f"train {full} epochs s (extrapolated) | score s/variant |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b, p, s = r["bytes_per_train_image"], r["peak_rss_mb"], r["seconds"]
        auto = " (auto)" if r["auto_statistics"] else ""
        auto += _budget_label(r)
        lines.append(
            f"| {r['backbone']} | {r['channels']} | {r['statistics']}{auto} | {r['train_images']} | "
            f"{r['test_images']} | {b['features'] / 1e6:.2f} | {b['statistics'] / 1e6:.3f} | "
            f"{b['dvc_cache'] / 1e6:.2f} | {b['total'] / 1e6:.2f} | {p['extract']:.0f} / {p['train']:.0f} / "
            f"{p['score']:.0f} | {_sec(s['extract'])} | {_sec(s['train_per_variant'])} | "
            f"{_sec(s['train_per_epoch_per_variant'])} | {_sec(s['train_per_variant_extrapolated'])} | "
            f"{_sec(s['score_per_variant'])} |")
    lines += ["", "## Targets", ""]
    for name, ok, detail in targets(result):
        verdict = "NOT MEASURED" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- **{verdict}** {name}: {detail}")
    lines += ["", "## Projection (train.statistics auto)", "",
              "Disk: the per-image bytes measured at the largest size times the published image counts: feature "
              "stores (features counted uncompressed: pretrained features barely compress, Lite0's 1.10 MB -> 1.08 "
              "MB per image, while random weights' features compress better than real ones would), statistics, "
              "one center variant's projector and exported model per category (the paper's run), and a DVC cache "
              "copy where cache.type copies (dataset images and reports not counted). The default sweep's "
              "projectors (every norm x distribution) are shown apart, and the disk with the compression measured "
              "here. Peak RSS: measured at the largest size, plus what the planner's estimate (`polarocc plan`) "
              "adds from there to the whole dataset's image count as if it were one category (an upper bound: the "
              "stages work one category at a time) and to the default sweep's lockstep variants.", "",
              "| dataset | backbone | statistics | train | test | disk GB | disk GB, measured compression | "
              "disk GB, default sweep | peak RSS GiB (extract / train / score) | fits 64 GB disk, 128 GB RAM |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for p in result["projection"]:
        st = p["peak_rss_gb_by_stage"]
        lines.append(f"| {p['dataset']} | {p['backbone']} | {p['statistics']} | {p['train_images']} | "
                     f"{p['test_images']} | {p['disk_gb']:.1f} | {p['disk_gb_with_measured_compression']:.1f} | "
                     f"{p['disk_gb_default_sweep']:.1f} | {p['peak_rss_gb']:.1f} "
                     f"({st['extract']:.1f} / {st['train']:.1f} / {st['score']:.1f}) | "
                     f"{'yes' if p['fits'] else 'no'} |")
    plateau = result.get("plateau_images", 16)
    small = sorted({p["measured_at_train_images"] for p in result["projection"]
                    if p["measured_at_train_images"] < plateau})
    if small:
        lines += ["", f"**Measured at {', '.join(map(str, small))} training images only: fewer than one full batch "
                  f"or shard ({plateau} images), so the stages' buffers had not reached their full size and the "
                  "peak RSS projection is too low.**"]
    if result["skipped"]:
        lines += ["", "## Not measured", ""]
        lines += [f"- {s['backbone']} {s['statistics']} N={s['train_images']}{_budget_label(s)}: {s['reason']}"
                  for s in result["skipped"]]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, result: dict, base: dict) -> None:
    result["rows"].sort(key=lambda r: (r["backbone"], r["statistics"], bool(_budget_label(r)), r["train_images"]))
    result["projection"] = projection(result["rows"], result["dvc_cache"]["adds_copy"], base)
    write_json(out / "bench_scale.json", result, indent=2, newline=True)
    write_text(out / "bench_scale.md", to_markdown(result))


# ---------------------------------------------------------------------------------------------------- main


def parse_skip(text: str, budgets: list[str]) -> set[tuple[str, str, int, str]]:
    """(backbone, statistics, N, budget) runs to leave out; an item without a budget leaves out every budget."""
    if text.strip().lower() in ("", "none"):
        return set()
    out = set()
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (3, 4) or not parts[2].isdigit():
            raise SystemExit(f"--skip: {item!r} is not BACKBONE:STATISTICS:N[:BUDGET]")
        for budget in parts[3:] or budgets:
            out.add((parts[0], parts[1], int(parts[2]), budget))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="32,128,512", help="training images per run (test: a quarter)")
    parser.add_argument("--backbones", default="wide_resnet50_2,tf_efficientnet_lite0")
    parser.add_argument("--statistics", default="stored,streamed", help="train.statistics modes")
    parser.add_argument("--skip", default=DEFAULT_SKIP,
                        help="BACKBONE:STATISTICS:N[:BUDGET] runs left out, comma-separated ('none': run all)")
    parser.add_argument("--budgets", default=PROJECT_BUDGET,
                        help="memory budgets: 'project' (params.yaml's) and/or MB for train.stats_memory_mb and "
                             "score.metrics_memory_mb (e.g. 'project,1')")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (extrapolated to train.epochs)")
    parser.add_argument("--distributions", default="normal",
                        help="center distributions trained in lockstep per stage (times are per variant)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the throw-away projects go (default: the system temp folder); put it on the "
                             "disk the pipeline uses")
    parser.add_argument("--out", type=Path, default=ROOT / "reports")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="base params")
    parser.add_argument("--seed", type=int, default=1024, help="seed of the generated images")
    parser.add_argument("--keep", action="store_true", help="keep the throw-away projects (debugging)")
    parser.add_argument("--markdown-only", action="store_true",
                        help="recompute the projection and rewrite the .md from <out>/bench_scale.json")
    parser.add_argument("--stage", choices=("extract", "train", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child(args.stage, args.project.resolve())
        return

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    backbones = [b.strip() for b in args.backbones.split(",") if b.strip()]
    modes = [m.strip() for m in args.statistics.split(",") if m.strip()]
    distributions = [d.strip() for d in args.distributions.split(",") if d.strip()]
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    if not budgets or any(b != PROJECT_BUDGET and not (b.isdigit() and int(b) > 0) for b in budgets):
        raise SystemExit("--budgets takes 'project' and/or positive integers (MB)")
    skip = parse_skip(args.skip, budgets)
    if not sizes or min(sizes) < 1 or args.epochs < 1:
        raise SystemExit("--sizes must be positive integers and --epochs >= 1")
    if set(modes) - {STORED, STREAMED}:
        raise SystemExit("--statistics takes stored and/or streamed")
    base = read_yaml(args.params.read_text(encoding="utf-8"))
    base_params = load_params(args.params)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.markdown_only:
        write_outputs(out, json.loads((out / "bench_scale.json").read_text(encoding="utf-8")), base)
        print((out / "bench_scale.md").read_text(encoding="utf-8"))
        return
    env = dict(os.environ)

    print("machine and DVC cache ...", file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "machine": machine(), "rows": [], "projection": [],
        # extra keys
        "complete": False, "epochs": args.epochs, "extrapolated_epochs": base_params.train.epochs,
        "variants": len(distributions), "distributions": distributions, "sizes": sizes, "backbones": backbones,
        "statistics_modes": modes, "memory_budgets": budgets, "skip": sorted(":".join(map(str, s)) for s in skip),
        "dvc_cache": dvc_cache(ROOT), "skipped": [], "failed": [], "generate_seconds": {},
        "plateau_images": max(base_params.extract.shard_images, base_params.train.batch_size),
        "units": {"bytes_per_train_image": "bytes", "peak_rss_mb": "MiB", "peak_rss_gb": "GiB",
                  "disk_gb": "GB (1e9 bytes)", "seconds": "wall seconds of the stage function"},
        "notes": [
            "Wide-ResNet50 runs with backbone.weights random (seeded timm initialisation): benchmark only, its "
            "features are not pretrained, so its AUROCs mean nothing. Lite0 uses the packaged ImageNet weights.",
            "Extraction runs as the DVC stage does after `check` (files not decoded twice); the images are 256 px "
            "texture crops resized to 256 and center-cropped to 224.",
            f"Training: {args.epochs} epoch(s) measured; 'train s/epoch' is the epoch loop alone (statistics "
            "read or formed, steps) and the extrapolation adds the fixed part (store opening, radius certificate, "
            "saving) once.",
            "Peak RSS: getrusage(RUSAGE_SELF).ru_maxrss of the stage process, imports included, glibc's "
            "allocator as the environment sets it (MALLOC_MMAP_THRESHOLD_="
            f"{os.environ.get('MALLOC_MMAP_THRESHOLD_') or 'unset'}).",
            "Feature bytes are measured on disk (lz4 by default). Post-ReLU features of the random-weight "
            "Wide-ResNet50 hold many zeros and compress to about 58% of their 11.24 MB; pretrained features may "
            "compress less, so the projection also shows the disk with uncompressed features.",
            "Stored statistics are held in memory while they fit train.stats_memory_mb "
            f"({base_params.train.stats_memory_mb} MB), else read from disk a batch at a time: stored peak RSS "
            "grows with N up to that bound.",
        ]}
    write_outputs(out, result, base)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on `kill` as on Ctrl-C
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.gettempdir())
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="polarocc-bench-scale-", dir=workdir))  # ours alone: removed at the end
    plan = [(n, b, m, g) for n in sizes for b in backbones for m in modes for g in budgets if (b, m, n, g) not in skip]
    for b, m, n, g in sorted(skip):
        if b in backbones and m in modes and n in sizes and g in budgets:
            result["skipped"].append({"backbone": b, "statistics": m, "train_images": n, "memory_budget": g,
                                      "reason": "left out by --skip (to keep the run short)"})
    shapes: dict[str, tuple[int, int, int]] = {}
    started = time.perf_counter()
    print(f"{len(plan)} runs in {run_dir}", file=sys.stderr, flush=True)
    try:
        done = 0
        for n in sizes:
            todo = [(b, m, g) for size, b, m, g in plan if size == n]
            if not todo:
                continue
            data = run_dir / f"data-{n}"
            print(f"[{time.perf_counter() - started:6.0f} s] generating {n} training + {test_count(n)} test "
                  f"images ...", file=sys.stderr, flush=True)
            began = time.perf_counter()
            n_train, n_test = make_dataset(data, n, args.seed)
            result["generate_seconds"][str(n)] = time.perf_counter() - began
            for backbone, mode, budget in todo:
                done += 1
                label = f"{backbone} {mode} N={n_train} budgets {budget}"
                print(f"[{time.perf_counter() - started:6.0f} s] run {done}/{len(plan)}: {label}", file=sys.stderr,
                      flush=True)
                if backbone in shapes:
                    needed = needed_bytes(*shapes[backbone], mode, n_train, n_test) + GIB
                    where, free = free_bytes(run_dir)
                    if needed > free:
                        reason = (f"disk: needs about {human_bytes(needed)} but {human_bytes(free)} is free at "
                                  f"{where}")
                        print(f"    skipped: {reason}", file=sys.stderr, flush=True)
                        result["skipped"].append({"backbone": backbone, "statistics": mode, "train_images": n_train,
                                                  "memory_budget": budget, "reason": reason})
                        write_outputs(out, result, base)
                        continue
                project = run_dir / f"{backbone}-{mode}-{n}-{budget}"
                project.mkdir()
                try:
                    raw = project_params(base, data, backbone, mode, args.epochs, distributions, budget)
                    write_text(project / "params.yaml", dump_yaml(raw))
                    load_params(project / "params.yaml")  # refuse bad params before any stage runs
                    row = measure_row(project, backbone, mode, n_train, n_test, args.epochs, distributions,
                                      base_params.train.epochs, result["dvc_cache"]["adds_copy"], env, budget)
                    shapes[backbone] = tuple(row["feature_shape"])
                    result["rows"].append(row)
                except StageFailed as exc:
                    disk = exc.stage == "extract" and "free" in exc.message and "needs" in exc.message
                    entry = {"backbone": backbone, "statistics": mode, "train_images": n_train, "memory_budget": budget,
                             "reason": f"{exc.stage} stage: {exc.message}"}
                    (result["skipped"] if disk else result["failed"]).append(entry)
                    print(f"    {'skipped' if disk else 'FAILED'}: {entry['reason']}", file=sys.stderr, flush=True)
                finally:
                    if not args.keep:
                        shutil.rmtree(project, ignore_errors=True)
                write_outputs(out, result, base)
            if not args.keep:
                shutil.rmtree(data, ignore_errors=True)
        result["complete"] = True
        result["total_seconds"] = time.perf_counter() - started
        write_outputs(out, result, base)
    finally:
        if args.keep:
            print(f"kept {run_dir}", file=sys.stderr)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(to_markdown(result))
    print(f"wrote {out / 'bench_scale.json'} and {out / 'bench_scale.md'} in "
          f"{result['total_seconds'] / 60:.1f} min", file=sys.stderr)
    if result["failed"]:
        raise SystemExit(f"{len(result['failed'])} run(s) failed: see 'failed' in the JSON")


if __name__ == "__main__":
    main()
