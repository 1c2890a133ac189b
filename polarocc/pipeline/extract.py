"""Stage ``extract``: one dataset's categories into feature stores, every input checked first."""

from __future__ import annotations

import time

from tqdm import tqdm

from polarocc import layout
from polarocc.atomic import write_json
from polarocc.config import Params, check_datasets_exist
from polarocc.data.images import Geometry, image_size
from polarocc.data.samples import Sample
from polarocc.device import pick_device
from polarocc.errors import ConfigError
from polarocc.features import store as fs
from polarocc.features.budget import STORED, check_disk_for_extraction, folder_bytes, resolve_statistics
from polarocc.features.distributed import WorkerSpec, cluster_client, extract_category_distributed
from polarocc.features.extract import CategoryExtractor, extract_category, read_category
from polarocc.geometry import size_record
from polarocc.models.backbone import backbone_record, build_extractor, check_model_name
from polarocc.models.tiling import TiledExtractor, for_geometry


def run_extract(params: Params, dataset: str, progress: bool = True,
                check_files: bool = True) -> dict[str, dict[str, int]]:
    """Extract every category of ``dataset``; returns shards computed per category and split.

    ``check_files=False`` skips decoding every file first, for when the ``check`` stage just did.
    """
    if dataset not in params.datasets:
        raise ConfigError(f"dataset {dataset!r} is not declared under params key 'datasets'")
    check_model_name(params.backbone.name)
    check_datasets_exist(params)
    ds = params.datasets[dataset]
    root = layout.dataset_root(params, dataset)
    # Read and check every category's file list before the backbone runs on any of them.
    samples = {cat: read_category(root, cat, check=check_files, progress=progress) for cat in ds.categories}

    b, e = params.backbone, params.extract
    geometries = {cat: category_geometry(params, samples[cat], f"{dataset}/{cat}") for cat in ds.categories}
    extractor = build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)
    layouts, tiles, backbone = {}, {}, None
    for cat, geometry in geometries.items():
        features = for_geometry(extractor, geometry)
        spec = features.spec(geometry.size)
        tiles[cat] = features.count(geometry.size) if isinstance(features, TiledExtractor) else 1
        statistics = resolve_statistics(params.train.statistics, spec.channels, spec.height, spec.width, e.dtype)
        layouts[cat] = fs.StoreLayout(spec.channels, spec.height, spec.width, size_record(geometry.size), e.dtype,
                                      e.shard_images, e.compressor, e.level, stored_statistics=statistics == STORED)
        backbone = backbone_record(b, spec)
    # Before the backbone sees any image: the stores must fit the free disk (partial stores are reused in place).
    target = layout.feature_store(params, dataset, ds.categories[0]).parent
    check_disk_for_extraction(dataset, layouts, samples, target, str(target.relative_to(params.root)),
                              [layout.partial_store(params, dataset, cat) for cat in ds.categories])
    device = pick_device(e.device, "extract.device")
    assert backbone is not None
    if e.scheduler != "inprocess":
        start = time.perf_counter()
        computed = _extract_on_cluster(params, dataset, samples, layouts, geometries, backbone, device, progress)
        # The cluster runs the categories one after another: the dataset's time, shared by image count.
        total = time.perf_counter() - start
        images = {cat: sum(len(v) for v in samples[cat].values()) for cat in ds.categories}
        seconds = {cat: total * images[cat] / max(sum(images.values()), 1) for cat in ds.categories}
        write_extraction_record(params, dataset, geometries, tiles, samples, computed, seconds, device)
        return computed
    computed, seconds = {}, {}
    for cat in tqdm(ds.categories, desc=f"extract {dataset}", unit="category", disable=not progress):
        start = time.perf_counter()
        runner = CategoryExtractor(extractor, geometries[cat], e.batch_size, e.dtype, device)
        computed[cat] = extract_category(runner, samples[cat], layouts[cat], backbone,
                                         layout.feature_store(params, dataset, cat),
                                         layout.partial_store(params, dataset, cat), progress)
        seconds[cat] = time.perf_counter() - start
    write_extraction_record(params, dataset, geometries, tiles, samples, computed, seconds, device)
    return computed


def write_extraction_record(params: Params, dataset: str, geometries: dict[str, Geometry],
                            tiles: dict[str, int], samples: dict[str, dict[str, list[Sample]]],
                            computed: dict[str, dict[str, int]], seconds: dict[str, float], device: str) -> None:
    """reports/extract/<dataset>.json: per category the input geometry, tiles per image, what this run's
    extraction cost per image it computed (wall seconds; a resumed run computes only the pending shards) and what
    the store holds per image on disk (features alone, and with masks and statistics)."""
    categories = {}
    for cat, geometry in geometries.items():
        store = layout.feature_store(params, dataset, cat)
        images = sum(len(v) for v in samples[cat].values())
        shard = params.extract.shard_images
        computed_images = sum(min(computed[cat].get(split, 0) * shard, len(items))
                              for split, items in samples[cat].items())
        features = sum(folder_bytes(store / split / "features") for split in fs.SPLITS)
        categories[cat] = {
            "geometry": geometry.record(), "input_height": geometry.size[0], "input_width": geometry.size[1],
            "tiles_per_image": tiles[cat],
            "images": images, "images_computed": computed_images, "seconds": round(seconds[cat], 3),
            "seconds_per_image": round(seconds[cat] / max(computed_images, 1), 5),
            "feature_bytes_per_image": round(features / max(images, 1)),
            "store_bytes_per_image": round(folder_bytes(store) / max(images, 1))}
    write_json(layout.extraction_record(params, dataset), {"dataset": dataset, "device": device,
                                                           "categories": categories})


def category_geometry(params: Params, samples: dict[str, list[Sample]], name: str) -> Geometry:
    """The model input geometry of one category: ``backbone.resize/crop/tiles``, made concrete from the size of its
    first training image when the resize keeps the aspect ratio (every image of the category gets that size)."""
    spec = params.backbone.geometry()
    if spec.fixed:
        return spec.resolve()
    first = samples["train"][0].path
    width, height = image_size(first)
    return spec.resolve((height, width),
                        f"{name} (whose first training image {first.name} is {height}x{width}, height x width)")


def _extract_on_cluster(params: Params, dataset: str, samples: dict, layouts: dict[str, fs.StoreLayout],
                        geometries: dict[str, Geometry], backbone: dict, device: str,
                        progress: bool) -> dict[str, dict[str, int]]:
    b, e = params.backbone, params.extract
    with cluster_client(e.scheduler, e.workers, e.threads_per_worker, gpu=device == "cuda") as client:
        computed = {}
        for cat in tqdm(params.datasets[dataset].categories, desc=f"extract {dataset} on dask", unit="category",
                        disable=not progress):
            spec = WorkerSpec(b.name, tuple(b.layers), b.pool, b.weights, tuple(backbone["mean"]),
                              tuple(backbone["std"]), geometries[cat].record(), e.batch_size, e.dtype, device)
            computed[cat] = extract_category_distributed(client, spec, samples[cat], layouts[cat], backbone,
                                                         layout.feature_store(params, dataset, cat),
                                                         layout.partial_store(params, dataset, cat), progress)
        return computed
