"""``polarocc plan``: what a run will take before anything runs (image counts, bytes, peak memory, free disk).

The feature shape is measured by a dry run of the configured backbone built with seeded random weights (no
weights file is read; the shape does not depend on the weights). Store sizes are exact uncompressed array bytes
(:mod:`polarocc.features.budget`); float16 features barely compress, so they are close to the bytes on disk.

Peak memory per stage is an **estimate**: a base process size plus the few large buffers each stage holds at once,
with the factors below (:data:`ESTIMATE`). It is meant to say whether a run fits a machine with a margin, not to
predict the resident size to the megabyte. Models written by the train, export and online stages are counted;
reports and plots are not (small).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polarocc import layout
from polarocc.config import ClassificationDatasetConfig, Params, check_datasets_exist, resolve
from polarocc.data.images import image_size
from polarocc.errors import DataError
from polarocc.features.budget import (
    GRAM_ITEMSIZE,
    STORED,
    StoreBytes,
    feature_bytes_per_image,
    folder_bytes,
    free_bytes,
    human_bytes,
    resolve_statistics,
    store_bytes,
)
from polarocc.features.store import StoreLayout
from polarocc.geometry import Geometry, size_record
from polarocc.models.weights import RANDOM, UNTRAINED
from polarocc.scoring.maps import chunk_images
from polarocc.training.statistics import STREAM_BLOCK_BYTES

MIB = 2 ** 20
LINK_TYPES = ("reflink", "hardlink", "symlink")  # DVC cache links that add no bytes
NO_PROJECT = "no DVC project"

# Every constant of the peak-memory estimates, in one place (bytes or multiples of a buffer). Estimates.
ESTIMATE: dict[str, int] = {
    "base_process_bytes": 512 * MIB,  # Python, torch, timm, zarr and dask imported, before any data
    "live_module_outputs": 2,  # a forward pass holds the largest layer's input and output at once (float32)
    "aggregation_copies": 3,  # feature levels, their pooled/upsampled copies and the concatenation (float32)
    "forward_lanes_cpu": 2,  # extract on a CPU: two shards in the backbone at once (features.extract, _lanes)
    "adam_copies": 4,  # train: weights, gradient and Adam's two moments, per lockstep variant
    "score_float_copies": 4,  # score: features cast to float32, z, z - c and its square (one model, one chunk)
    "polar_float64_copies": 2,  # score: the polar diagnostics' float64 rows and unit vectors of a chunk
    "map_copies": 2,  # score: upsampled and smoothed maps (float32)
    "binned_metrics_bytes_per_model": 24 * MIB,  # score: a binned pixel-metric accumulator (fixed histograms)
}


@dataclass(frozen=True)
class BackboneShape:
    """What a dry run of the backbone says: feature shape, parameter bytes and activation bytes per image."""

    name: str
    weights: str
    layers: list[int]
    input_size: tuple[int, int]  # the model input (height, width), as extraction resolves it
    channels: int
    height: int
    width: int
    parameter_bytes: int
    activation_bytes_per_image: int  # float32, see ESTIMATE
    pooled_channels: int | None = None  # Protocol A (only measured when protocol_a.datasets is not empty)
    pooled_parameter_bytes: int | None = None
    tiles: int = 1  # tiles per image (each a forward of the backbone)
    geometry_source: str = "params"  # where an aspect-preserving resize took its aspect ratio


@dataclass(frozen=True)
class DatasetPlan:
    """One dataset's images and store bytes."""

    name: str
    protocol: str  # B (pixel stores, one per category) or A (one pooled store)
    source: str  # where the counts come from: files, embedded_data params, reader
    categories: int  # Protocol A: classes that take a turn as normal
    train: int
    test: int
    test_good: int | None
    test_defective: int | None
    max_train: int  # the largest category's (what one train/score job holds)
    max_test: int
    bytes: StoreBytes
    model_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {**{k: v for k, v in asdict(self).items() if k != "bytes"}, "bytes": self.bytes.to_dict()}


@dataclass(frozen=True)
class RunPlan:
    """The whole run: datasets, bytes, DVC cache, disk and memory, and whether it fits."""

    backbone: BackboneShape
    statistics: str  # stored | streamed (train.statistics resolved for this backbone)
    datasets: list[DatasetPlan]
    store_bytes: StoreBytes
    model_bytes: int
    dvc_cache: dict[str, Any]  # link (the link type DVC will use, or why none), types (cache.type), bytes
    disk: dict[str, Any]  # target, checked (nearest existing folder), free, needed, existing, fits
    memory: dict[str, Any]  # total, extract, train, score (peak estimates, bytes), fits
    notes: list[str] = field(default_factory=list)
    # expected seconds of each stage, filled in by polarocc.timing.with_stage_times from bench/runtime.py's costs:
    # {stage: {seconds, runs, controls}}
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    timing_source: dict[str, Any] = field(default_factory=dict)

    @property
    def expected_seconds(self) -> float:
        """The whole run's expected seconds (the sum of the stages')."""
        return sum(s["seconds"] for s in self.stages.values())

    @property
    def fits(self) -> bool:
        """Both the disk and the memory estimates fit."""
        return bool(self.disk["fits"] and self.memory["fits"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (``json.dumps`` works on it as is)."""
        return {"backbone": asdict(self.backbone), "statistics": self.statistics,
                "datasets": [d.to_dict() for d in self.datasets], "store_bytes": self.store_bytes.to_dict(),
                "model_bytes": self.model_bytes, "dvc_cache": self.dvc_cache, "disk": self.disk,
                "memory": self.memory, "fits": self.fits, "estimate_constants": dict(ESTIMATE), "notes": self.notes,
                "stages": self.stages, "expected_seconds": round(self.expected_seconds, 1),
                "timing_source": self.timing_source}


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _pooled_model(name: str) -> torch.nn.Module:
    """The full classifier network without weights (meta device: allocates nothing), for its width and size."""
    import timm

    try:
        with torch.device("meta"):
            return timm.create_model(name, pretrained=False)
    except Exception:  # some models compute values at init that the meta device cannot give
        return timm.create_model(name, pretrained=False)


def measure_backbone(params: Params) -> BackboneShape:
    """Build the configured backbone with seeded random weights (no file read, no warning) and dry-run it at the model
    input's size (one tile when tiled); forward hooks record the largest layer output for the activation estimate.
    """
    from polarocc.models.backbone import build_extractor
    from polarocc.models.tiling import TiledExtractor, for_geometry

    b = params.backbone
    geometry, source = planned_geometry(params)
    extractor = build_extractor(b.name, b.layers, b.pool, RANDOM, b.mean, b.std, warn=False)
    largest = [0]

    def record(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        largest[0] = max([largest[0], *(t.numel() * t.element_size() for t in _tensors(output))])

    handles = [m.register_forward_hook(record) for m in extractor.backbone.modules()]
    try:
        tiled = for_geometry(extractor, geometry)
        spec = tiled.spec(geometry.size)
        tiles = tiled.count(geometry.size) if isinstance(tiled, TiledExtractor) else 1
    finally:
        for handle in handles:
            handle.remove()
    features = spec.channels * spec.height * spec.width * 4
    activations = ESTIMATE["live_module_outputs"] * (largest[0] or features) + \
        ESTIMATE["aggregation_copies"] * features
    pooled = pooled_bytes = None
    if params.protocol_a.datasets:
        model = _pooled_model(b.name)
        pooled, pooled_bytes = int(model.num_features), _parameter_bytes(model)
    return BackboneShape(b.name, str(b.weights), list(b.layers), geometry.size, spec.channels, spec.height,
                         spec.width, _parameter_bytes(extractor), activations, pooled, pooled_bytes, tiles, source)


def planned_geometry(params: Params) -> tuple[Geometry, str]:
    """The model input geometry extraction will use, and where its aspect ratio comes from: the params alone, or
    (aspect-preserving resize) the first training image of the first Protocol B category that exists already (the
    embedded data's size from its params before ``prepare`` has written it)."""
    spec = params.backbone.geometry()
    if spec.fixed:
        return spec.resolve(), "params"
    for name, ds in params.datasets.items():
        folder = resolve(params, ds.path) / ds.categories[0] / "train" / "good"
        first = min(folder.iterdir(), default=None) if folder.is_dir() else None
        if first is not None and first.is_file():
            width, height = image_size(first)
            return (spec.resolve((height, width), f"{name}/{ds.categories[0]}"),
                    f"{first} ({height}x{width}, height x width)")
    from polarocc.data.textures import image_shape

    size = image_shape(params.embedded_data.image_size, params.embedded_data.variant)
    return spec.resolve(size, "the embedded data"), f"embedded_data ({size[0]}x{size[1]})"


def protocol_b_layout(params: Params, shape: BackboneShape) -> StoreLayout:
    """The store layout ``extract`` will use (as :func:`polarocc.pipeline.extract.run_extract` builds it)."""
    e = params.extract
    statistics = resolve_statistics(params.train.statistics, shape.channels, shape.height, shape.width, e.dtype)
    return StoreLayout(shape.channels, shape.height, shape.width, size_record(shape.input_size), e.dtype,
                       e.shard_images, e.compressor, e.level, stored_statistics=statistics == STORED)


def protocol_a_layout(params: Params, shape: BackboneShape) -> StoreLayout:
    """The pooled store layout of ``extract_a`` (float32, one position per image)."""
    e, a = params.extract, params.protocol_a
    return StoreLayout(shape.pooled_channels or 0, 1, 1, a.crop, "float32", max(e.shard_images, 64), e.compressor,
                       e.level, image_level=True)


def _is_generated(params: Params, root: Path) -> bool:
    return root.resolve() == resolve(params, params.embedded_data.output).resolve()


def category_counts(params: Params, dataset: str) -> tuple[dict[str, tuple[int, int, int]], str]:
    """Per category (train, test good, test defective) of a Protocol B dataset, and where they come from: the
    files (MVTec layout), or, for the embedded dataset before ``prepare`` wrote it, its ``embedded_data`` params."""
    from polarocc.data.mvtec import read_split

    root = layout.dataset_root(params, dataset)
    generated = _is_generated(params, root)
    t = params.embedded_data
    counts, sources = {}, set()
    for cat in params.datasets[dataset].categories:
        if generated and not (root / cat).is_dir():
            counts[cat] = (t.train, t.test_good, t.defects_per_type * len(t.defect_types))
            sources.add("embedded_data params")
            continue
        test = read_split(root, cat, "test")
        good = sum(1 for s in test if s.label == 0)
        counts[cat] = (len(read_split(root, cat, "train")), good, len(test) - good)
        sources.add("files")
    return counts, " + ".join(sorted(sources))


def _protocol_a_data(params: Params, ds: ClassificationDatasetConfig):
    """The dataset as its reader gives it (the dispatch of :func:`polarocc.detector.protocol_a.load_dataset`)."""
    from polarocc.data import classification as c

    if ds.format == "digits":
        return c.read_digits(seed=params.center.seed)
    readers = {"cifar10": c.read_cifar10, "cifar100": c.read_cifar100, "fashion_mnist": c.read_fashion_mnist,
               "image_folder": c.read_image_folder,
               "mvtec": lambda r: c.read_mvtec_image_level(r, None if ds.classes == "all" else tuple(ds.classes))}
    try:
        return readers[ds.format](resolve(params, ds.path))
    except DataError as exc:
        raise DataError(f"params key 'protocol_a.datasets.{ds.name}.path': {exc}") from exc


PROTOCOL_A_ITEMSIZE = 4  # Protocol A projectors train and are saved in float32


def _projector_bytes(channels: int, itemsize: int = 4) -> int:
    """One saved projector: C x C weights, bias and center (saved in float32)."""
    return (channels * channels + 2 * channels) * itemsize


def plan_datasets(params: Params, shape: BackboneShape) -> list[DatasetPlan]:
    """Counts and bytes of every Protocol B and Protocol A dataset."""
    variants = len(params.sweep.distributions) * len(params.sweep.norms)
    store_layout = protocol_b_layout(params, shape)
    plans = []
    for name in params.datasets:
        counts, source = category_counts(params, name)
        total = StoreBytes()
        for train, good, defective in counts.values():
            total += store_bytes(store_layout, train, good + defective)
        per_category = variants + 1 + (name in params.protocol_c.datasets)  # sweep, export, online
        plans.append(DatasetPlan(
            name, "B", source, len(counts), sum(c[0] for c in counts.values()),
            sum(c[1] + c[2] for c in counts.values()), sum(c[1] for c in counts.values()),
            sum(c[2] for c in counts.values()), max(c[0] for c in counts.values()),
            max(c[1] + c[2] for c in counts.values()), total,
            len(counts) * per_category * _projector_bytes(shape.channels)))
    a_layout = protocol_a_layout(params, shape) if params.protocol_a.datasets else None
    for name, ds in params.protocol_a.datasets.items():
        data = _protocol_a_data(params, ds)
        classes = len(data.classes) if ds.classes == "all" else len(ds.classes)
        n_train, n_test = len(data.train), len(data.test)
        plans.append(DatasetPlan(
            name, "A", "reader", classes, n_train, n_test, None, None, n_train, n_test,
            store_bytes(a_layout, n_train, n_test),
            classes * variants * _projector_bytes(shape.pooled_channels or 0, PROTOCOL_A_ITEMSIZE)))
    return plans


def dvc_cache_link(root: Path, target: Path) -> tuple[str | None, list[str], str]:
    """(the cache link type DVC will use for outputs at ``target``, the configured ``cache.type`` list, a note).

    DVC tries the configured types in order and uses the first that works between its cache and the workspace
    (this asks DVC's own link test), except that a failing ``reflink`` listed first leaves new outputs as
    copies. The link is ``"no DVC project"`` when ``root`` is not one (no cache), None when it cannot be told
    or no configured type works.
    """
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.repo import Repo
        from dvc_objects.fs.generic import test_links
    except ImportError:
        return None, [], "dvc is not installed"
    try:
        repo = Repo(str(root))
    except NotDvcRepoError:
        return NO_PROJECT, [], f"{Path(root).resolve()} is not a DVC project: no DVC cache"
    except Exception as exc:  # a damaged .dvc/config: say so, count the cache as full copies
        return None, [], f"cannot open the DVC project ({type(exc).__name__}: {exc})"
    try:
        odb = repo.cache.local
        types = list(odb.cache_types)
        probe = target / "polarocc-plan-probe"  # the test links a temporary file beside this (never this itself)
        working = test_links(types, odb.fs, odb.path, repo.fs, str(probe))
    except Exception as exc:
        return None, [], f"cannot test DVC's cache links ({type(exc).__name__}: {exc})"
    finally:
        repo.close()
    if not working:
        return None, types, f"none of cache.type {','.join(types)} works here"
    if types and types[0] == "reflink" and working[0] != "reflink":
        # DVC cannot tell a failed reflink from a copy: it then leaves a stage's fresh outputs as copies.
        return "copy", types, ("cache.type lists reflink first but reflinks do not work here, so DVC keeps copies "
                               "of new outputs; put hardlink first (dvc config cache.type hardlink,symlink)")
    return working[0], types, ""


def total_memory() -> int:
    """Physical memory of this machine in bytes."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def extract_memory(params: Params, shape: BackboneShape, store_layout: StoreLayout) -> int:
    """Peak of ``extract``: parameters; per forward lane (two on a CPU with two or more cores, else one) a batch's
    activations; the shards in the lanes and the one being written, in the store's dtype; one image's float64
    features and the shard's statistics (Gram matrices when stored); the decoded images of the shards ahead. Per
    worker process with the ``local`` scheduler."""
    e, est = params.extract, ESTIMATE
    input_pixels = shape.input_size[0] * shape.input_size[1]
    c, h, w, shard = shape.channels, shape.height, shape.width, e.shard_images
    on_cpu = e.device == "cpu" or (e.device == "auto" and not torch.cuda.is_available())
    threads = e.threads_per_worker if e.scheduler != "inprocess" else (os.cpu_count() or 1)
    lanes = est["forward_lanes_cpu"] if on_cpu and threads >= 2 else 1
    process = (shape.parameter_bytes + lanes * min(e.batch_size, shard) * shape.activation_bytes_per_image
               + (lanes + 1) * shard * feature_bytes_per_image(c, h, w, e.dtype)
               + c * h * w * (GRAM_ITEMSIZE + 4)
               + shard * (c * c + c if store_layout.stored_statistics else c) * GRAM_ITEMSIZE
               + (lanes + 1) * shard * input_pixels * 3)
    if shape.pooled_parameter_bytes is not None:  # extract_a: the whole classifier, smaller images
        scale = params.protocol_a.crop ** 2 / input_pixels
        process = max(process, int(shape.pooled_parameter_bytes + e.batch_size * scale *
                                   shape.activation_bytes_per_image))
    workers = e.workers if e.scheduler == "local" else 1
    return est["base_process_bytes"] * (1 + (workers if e.scheduler == "local" else 0)) + workers * process


def train_memory(params: Params, shape: BackboneShape, store_layout: StoreLayout, max_train: int,
                 a_images: int = 0) -> int:
    """Peak of ``train`` (Gram trainer, one category at a time; categories too small for threads train side by
    side, each within an equal share of ``train.stats_memory_mb``, so the bound holds): the statistics source
    (every stored Gram matrix while they fit ``train.stats_memory_mb``, else a batch of them; streamed: two
    batches of features and their float64 block; on a GPU the features may stay in device memory, not counted
    here) plus every lockstep variant's weights, gradient and Adam moments."""
    t, est = params.train, ESTIMATE
    c = shape.channels
    itemsize = np.dtype(t.dtype).itemsize
    variants = len(params.sweep.distributions)

    def lockstep(channels: int, size: int = itemsize) -> int:
        return variants * est["adam_copies"] * (channels * channels + channels) * size

    if store_layout.stored_statistics:
        every = max_train * c * c * GRAM_ITEMSIZE
        stats = every if every <= t.stats_memory_mb * MIB else 2 * t.batch_size * c * c * GRAM_ITEMSIZE
        stats += max_train * c * GRAM_ITEMSIZE
    else:
        per_image = feature_bytes_per_image(c, shape.height, shape.width, params.extract.dtype)
        stats = 2 * t.batch_size * per_image + min(STREAM_BLOCK_BYTES, t.batch_size * c * shape.height *
                                                   shape.width * itemsize) + 2 * c * c * itemsize
    peak = stats + lockstep(c)
    if shape.pooled_channels:  # Protocol A: every pooled feature in memory (direct trainer)
        peak = max(peak, a_images * shape.pooled_channels * 4 * 2
                   + lockstep(shape.pooled_channels, PROTOCOL_A_ITEMSIZE))
    return est["base_process_bytes"] + peak


def score_memory(params: Params, shape: BackboneShape, max_test: int) -> int:
    """Peak of ``score`` (one category at a time): a shard of test features, the float32 copies and maps of the
    images projected at once (:func:`chunk_images`), the models, and the pixel metrics (exact while they fit
    ``score.metrics_memory_mb``, else fixed histograms)."""
    from polarocc.scoring.pixel_metrics import EXACT_BYTES_COMPUTING, EXACT_BYTES_KEPT, result_workers

    e, est = params.extract, ESTIMATE
    input_pixels = shape.input_size[0] * shape.input_size[1]
    c, h, w = shape.channels, shape.height, shape.width
    shard, variants = min(e.shard_images, max(max_test, 1)), len(params.sweep.distributions)
    chunk = min(shard, chunk_images(c, h, w))  # the images projected at once
    features = (shard * feature_bytes_per_image(c, h, w, e.dtype)
                + chunk * c * h * w * (est["score_float_copies"] * 4 + est["polar_float64_copies"] * 8))
    maps = est["map_copies"] * chunk * input_pixels * 4
    pixels = max_test * input_pixels
    workers = result_workers(variants, variants, pixels, params.score.metrics_memory_mb)  # computed side by side
    exact = pixels * (variants * EXACT_BYTES_KEPT + workers * EXACT_BYTES_COMPUTING)
    pixel = exact if exact <= params.score.metrics_memory_mb * MIB else \
        variants * est["binned_metrics_bytes_per_model"]
    return est["base_process_bytes"] + features + maps + variants * (c * c + c) * 4 + pixel


def make_plan(params: Params, shape: BackboneShape | None = None) -> RunPlan:
    """The plan of a whole ``dvc repro`` with these params (``shape``: a measured backbone, else measured now)."""
    check_datasets_exist(params)
    shape = shape or measure_backbone(params)
    store_layout = protocol_b_layout(params, shape)
    datasets = plan_datasets(params, shape)
    stores = StoreBytes()
    for d in datasets:
        stores += d.bytes
    models = sum(d.model_bytes for d in datasets)
    target = params.root / layout.FEATURES
    checked, free = free_bytes(target)
    link, types, note = dvc_cache_link(params.root, checked)
    cache = 0 if link in (*LINK_TYPES, NO_PROJECT) else stores.total + models
    needed = stores.total + models + cache
    existing = sum(folder_bytes(p) for p in target.iterdir() if p.is_dir()) if target.is_dir() else 0
    disk = {"target": str(layout.FEATURES), "checked": str(checked), "free": free, "needed": needed,
            "existing_features": existing, "fits": needed <= free}
    b_sets = [d for d in datasets if d.protocol == "B"]
    a_sets = [d for d in datasets if d.protocol == "A"]
    max_train = max((d.max_train for d in b_sets), default=0)  # 0: only Protocol A datasets are declared
    max_test = max((d.max_test for d in b_sets), default=0)
    a_images = max((d.train + d.test for d in a_sets), default=0)
    total = total_memory()
    memory = {"total": total, "extract": extract_memory(params, shape, store_layout),
              "train": train_memory(params, shape, store_layout, max_train, a_images),
              "score": score_memory(params, shape, max_test)}
    memory["fits"] = max(memory["extract"], memory["train"], memory["score"]) <= total
    notes = [note] if note else []
    if params.backbone.weights in UNTRAINED:
        notes.append("backbone.weights is 'random': features are not pretrained (benchmark only; results are not "
                     "anomaly detection)")
    if existing:
        notes.append(f"{human_bytes(existing)} of features already under {layout.FEATURES} are not counted as free")
    return RunPlan(shape, STORED if store_layout.stored_statistics else "streamed", datasets, stores, models,
                   {"link": link, "types": types, "bytes": cache}, disk, memory, notes)


def human_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                strict=True)))
            .rstrip() for r in rows]


def format_plan(plan: RunPlan) -> str:
    """The plan as a plain-text table and summary lines."""
    s, h = plan.backbone, human_bytes
    tiled = f" in {s.tiles} tiles" if s.tiles > 1 else ""
    lines = [f"backbone {s.name}, layers {s.layers}, input {s.input_size[0]}x{s.input_size[1]}{tiled}"
             + (f" (aspect from {s.geometry_source})" if s.geometry_source != "params" else "")
             + f": {s.channels} x {s.height} x {s.width} features "
             f"per image (dry run), {h(s.parameter_bytes)} of parameters; training statistics {plan.statistics}"]
    rows = [["dataset", "protocol", "source", "categories", "train", "test", "features", "statistics", "masks",
             "models"]]
    for d in plan.datasets:
        test = f"{d.test}" if d.test_good is None else f"{d.test} ({d.test_good} good)"
        rows.append([d.name, d.protocol, d.source, str(d.categories), str(d.train), test, h(d.bytes.features),
                     h(d.bytes.statistics), h(d.bytes.masks), h(d.model_bytes)])
    t = plan.store_bytes
    rows.append(["total", "", "", "", str(sum(d.train for d in plan.datasets)),
                 str(sum(d.test for d in plan.datasets)), h(t.features), h(t.statistics), h(t.masks),
                 h(plan.model_bytes)])
    lines += _table(rows)
    cache, disk, mem = plan.dvc_cache, plan.disk, plan.memory
    link = cache["link"] or "no cache link"
    lines.append(f"dvc cache: +{h(cache['bytes'])} (cache.type {','.join(cache['types']) or '-'}: {link})")
    lines.append(f"disk: needs {h(disk['needed'])} at {disk['target']} ({disk['checked']}), {h(disk['free'])} free: "
                 + ("fits" if disk["fits"] else "DOES NOT FIT"))
    lines.append(f"memory (estimates): extract {h(mem['extract'])}, train {h(mem['train'])}, score "
                 f"{h(mem['score'])} of {h(mem['total'])}: " + ("fits" if mem["fits"] else "DOES NOT FIT"))
    if plan.stages:
        src = plan.timing_source
        lines.append(f"expected time: {human_seconds(plan.expected_seconds)} for a full `dvc repro` (per-unit costs "
                     f"measured by {src.get('source', '?')} on {src.get('machine', '?')}; a guide, within about 2x)")
        rows = [["stage", "runs", "expected", "shorter with"]]
        rows += [[name, str(st["runs"]), human_seconds(st["seconds"]), st["controls"]] for name, st in
                 plan.stages.items()]
        lines += ["  " + line for line in _time_table(rows)]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _time_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) if i in (1, 2) else cell.ljust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                     strict=True)))
            .rstrip() for r in rows]
