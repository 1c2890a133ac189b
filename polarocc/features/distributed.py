"""Feature extraction on a dask cluster: one task per shard, each worker builds the backbone once.

The driver creates (or resumes) the partial store and submits one task per unfinished shard. A task opens
the store, computes its shard and writes it whole: every array is chunked (or sharded) per shard, and the
``done`` flags one per chunk, so no two tasks ever write the same chunk, and a killed run resumes from the
flags like an in-process one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from distributed import Client, WorkerPlugin
from tqdm import tqdm

from polarocc.data.images import Geometry, resize_crop
from polarocc.data.samples import Sample
from polarocc.errors import ConfigError
from polarocc.features import store as fs
from polarocc.features.extract import CategoryExtractor, check_finite, store_fingerprint
from polarocc.models.backbone import build_extractor, build_pooled_extractor

# The extractor each worker process builds once per backbone spec (never pickled with the tasks).
_RUNNERS: dict[str, CategoryExtractor] = {}


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to build its extractor."""

    name: str
    layers: tuple[int, ...]
    pool: int
    weights: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    geometry: dict[str, Any]  # Geometry.record(): resize, crop, tiles
    batch_size: int
    dtype: str
    device: str
    pooled: bool = False  # Protocol A: the whole classifier read out before its last layer (layers, pool unused)

    def key(self) -> str:
        """Cache key of the worker's extractor."""
        return json.dumps(asdict(self), sort_keys=True)


def worker_runner(spec: WorkerSpec) -> CategoryExtractor:
    """This process's extractor for ``spec``, built on first use."""
    key = spec.key()
    if key not in _RUNNERS:
        extractor = (build_pooled_extractor(spec.name, spec.weights, spec.mean, spec.std) if spec.pooled
                     else build_extractor(spec.name, spec.layers, spec.pool, spec.weights, spec.mean, spec.std))
        _RUNNERS[key] = CategoryExtractor(extractor, Geometry.from_record(spec.geometry), spec.batch_size, spec.dtype,
                                          spec.device)
    return _RUNNERS[key]


def extract_shard(spec: WorkerSpec, store: str, split: str, shard: int, records: list[dict[str, Any]],
                  raw: np.ndarray | None = None) -> int:
    """Task: compute and write one whole shard of ``split`` in the partial store at ``store``.

    ``raw`` holds the shard's images when they live in memory (array datasets such as CIFAR), as uint8
    (B, h, w[, 3]) before resizing; otherwise the worker reads the samples' files.
    """
    runner = worker_runner(spec)
    group = zarr.open_group(store, mode="r+")
    items = [Sample.from_record(r) for r in records]
    geometry = runner.geometry
    images = runner.load(items) if raw is None else np.stack([resize_crop(image, geometry) for image in raw])
    features = runner.features(images)
    check_finite(features, items)
    runner.write(group[split], shard, fs.shard_size(group, split), items, features)
    return shard


class TorchThreads(WorkerPlugin):
    """Worker plugin: every worker (already running or joining later) uses ``threads`` torch threads."""

    name = "polarocc-torch-threads"

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        torch.set_num_threads(self.threads)


def make_client(scheduler: str, workers: int, threads_per_worker: int, gpu: bool = False) -> Client:
    """A dask client: a LocalCluster of ``workers`` processes, or the scheduler at an address; every worker runs
    one task at a time with ``threads_per_worker`` torch threads (the backbone is the parallel part)."""
    from dask.distributed import LocalCluster

    if scheduler == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                               resources={"GPU": 1} if gpu else None)
        client = Client(cluster)
    else:
        try:
            client = Client(scheduler, timeout=30)
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"extract.scheduler: cannot connect to the dask scheduler at {scheduler} "
                              f"({type(exc).__name__}); start it or use local or inprocess") from exc
    client.register_plugin(TorchThreads(threads_per_worker))
    return client


@contextmanager
def cluster_client(scheduler: str, workers: int, threads_per_worker: int, gpu: bool = False) -> Iterator[Any]:
    """:func:`make_client` for the duration of a block; a LocalCluster it started is shut down after."""
    client = make_client(scheduler, workers, threads_per_worker, gpu)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and scheduler == "local":
            cluster.close()


def extract_category_distributed(client: Client, spec: WorkerSpec, samples: dict[str, list[Sample]],
                                 layout: fs.StoreLayout, backbone: dict, final: Path, partial: Path,
                                 progress: bool = True,
                                 raw_images: Callable[[list[Sample]], np.ndarray] | None = None) -> dict[str, int]:
    """Build (or resume) one category store on the cluster and move it into place; returns shards computed.

    ``raw_images`` returns the in-memory images of a shard's samples (array datasets); each task then
    carries its shard's images instead of reading files.
    """
    from dask.distributed import as_completed

    geometry = Geometry.from_record(spec.geometry)
    fp = store_fingerprint(backbone, geometry, layout, samples)
    attrs = {"backbone": backbone, "geometry": geometry.record(), "layout": asdict(layout)}
    group = fs.create_or_resume(partial, fp, layout, samples, attrs)
    resources = {"GPU": 1} if spec.device == "cuda" else None  # one task per GPU at a time
    futures, computed = [], {}
    for split, items in samples.items():
        size = fs.shard_size(group, split)
        pending = fs.pending_shards(group, split)
        computed[split] = len(pending)
        for k in pending:
            part = items[k * size:(k + 1) * size]
            futures.append(client.submit(extract_shard, spec, str(partial), split, k, [s.to_record() for s in part],
                                         None if raw_images is None else raw_images(part), pure=False,
                                         resources=resources))
    with tqdm(total=len(futures), desc="  shards", unit="shard", disable=not progress, leave=False) as bar:
        for future in as_completed(futures):
            future.result()  # re-raises a task's error (bad image, NaN features) here, by name
            bar.update()
    fs.finalize(partial, final)
    return computed
