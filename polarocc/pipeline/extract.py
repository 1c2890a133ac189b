"""Stage ``extract``: one dataset's categories into feature stores, every input checked first."""

from __future__ import annotations

from tqdm import tqdm

from polarocc import layout
from polarocc.config import Params, check_datasets_exist
from polarocc.data.images import Geometry
from polarocc.device import pick_device
from polarocc.errors import ConfigError
from polarocc.features import store as fs
from polarocc.features.budget import STORED, check_disk_for_extraction, resolve_statistics
from polarocc.features.distributed import WorkerSpec, cluster_client, extract_category_distributed
from polarocc.features.extract import CategoryExtractor, extract_category, read_category
from polarocc.models.backbone import backbone_record, build_extractor, check_model_name


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
    geometry = Geometry(b.resize, b.crop)
    extractor = build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)
    spec = extractor.spec(b.crop)
    statistics = resolve_statistics(params.train.statistics, spec.channels, spec.height, spec.width, e.dtype)
    store_layout = fs.StoreLayout(spec.channels, spec.height, spec.width, b.crop, e.dtype, e.shard_images,
                            e.compressor, e.level, stored_statistics=statistics == STORED)
    # Before the backbone sees any image: the stores must fit the free disk (partial stores are reused in place).
    target = layout.feature_store(params, dataset, ds.categories[0]).parent
    check_disk_for_extraction(dataset, store_layout, samples, target, str(target.relative_to(params.root)),
                              [layout.partial_store(params, dataset, cat) for cat in ds.categories])
    device = pick_device(e.device, "extract.device")
    backbone = backbone_record(b, spec)
    if e.scheduler != "inprocess":
        return _extract_on_cluster(params, dataset, samples, store_layout, backbone, device, progress)
    runner = CategoryExtractor(extractor, geometry, e.batch_size, e.dtype, device)
    computed = {}
    for cat in tqdm(ds.categories, desc=f"extract {dataset}", unit="category", disable=not progress):
        computed[cat] = extract_category(runner, samples[cat], store_layout, backbone,
                                         layout.feature_store(params, dataset, cat),
                                         layout.partial_store(params, dataset, cat), progress)
    return computed


def _extract_on_cluster(params: Params, dataset: str, samples: dict, store_layout: fs.StoreLayout, backbone: dict,
                        device: str, progress: bool) -> dict[str, dict[str, int]]:
    b, e = params.backbone, params.extract
    spec = WorkerSpec(b.name, tuple(b.layers), b.pool, b.weights, tuple(backbone["mean"]), tuple(backbone["std"]),
                      b.resize, b.crop, e.batch_size, e.dtype, device)
    with cluster_client(e.scheduler, e.workers, e.threads_per_worker, gpu=device == "cuda") as client:
        return {cat: extract_category_distributed(client, spec, samples[cat], store_layout, backbone,
                                                  layout.feature_store(params, dataset, cat),
                                                  layout.partial_store(params, dataset, cat), progress)
                for cat in tqdm(params.datasets[dataset].categories, desc=f"extract {dataset} on dask",
                                unit="category", disable=not progress)}
