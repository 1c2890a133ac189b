"""Protocol A (image one-class classification): pooled features, one class normal, the rest anomalous."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from polarocc import layout
from polarocc.analysis.polar import ANOMALOUS, NORMAL, PolarAccumulator
from polarocc.config import (
    ClassificationDatasetConfig,
    Params,
    TrainConfig,
    check_protocol_a_paths,
    resolve,
)
from polarocc.data.classification import (
    ClassificationSplits,
    ClassSplit,
    read_cifar10,
    read_cifar100,
    read_digits,
    read_fashion_mnist,
    read_image_folder,
    read_mvtec_image_level,
)
from polarocc.data.images import Geometry, resize_crop
from polarocc.data.mvtec import check_files
from polarocc.data.samples import Sample
from polarocc.detector.model_files import load_model
from polarocc.device import pick_device
from polarocc.errors import DataError, NumericalError
from polarocc.features import store as fs
from polarocc.features.extract import CategoryExtractor, extract_category
from polarocc.features.store import FeatureStore
from polarocc.models.backbone import build_pooled_extractor, check_model_name
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.scoring.maps import project
from polarocc.training.direct import VariantLossDiverged, train_direct_lockstep
from polarocc.training.schedule import TrainHistory
from polarocc.training.threads import in_order, split_threads, threads_for, torch_threads

STORE_NAME = "images"


def load_dataset(params: Params, ds: ClassificationDatasetConfig) -> ClassificationSplits:
    """Read a Protocol A dataset from its path (or, for digits, from scikit-learn)."""
    if ds.format == "digits":
        return read_digits(seed=params.center.seed)
    root = resolve(params, ds.path)
    readers = {"cifar10": read_cifar10, "cifar100": read_cifar100, "fashion_mnist": read_fashion_mnist,
               "image_folder": read_image_folder,
               "mvtec": lambda r: read_mvtec_image_level(r, None if ds.classes == "all" else tuple(ds.classes))}
    try:
        return readers[ds.format](root)
    except DataError as exc:
        raise DataError(f"params key 'protocol_a.datasets.{ds.name}.path': {exc}") from exc


def _load_declared(params: Params, dataset: str) -> tuple[ClassificationDatasetConfig, ClassificationSplits,
                                                            list[str]]:
    """The dataset's config, its data and the classes that take a turn as normal, checked."""
    if dataset not in params.protocol_a.datasets:
        raise DataError(f"dataset {dataset!r} is not declared under params key 'protocol_a.datasets'")
    check_protocol_a_paths(params)
    ds = params.protocol_a.datasets[dataset]
    data = load_dataset(params, ds)
    return ds, data, selected_classes(data, ds)


def check_dataset(params: Params, dataset: str, progress: bool = True) -> dict:
    """Read a Protocol A dataset, check its class list and decode every image file; returns counts."""
    _, data, classes = _load_declared(params, dataset)
    for split in (data.train, data.test):
        if isinstance(split.images, list):
            check_files(_samples(split, data.classes, ""), progress)
    counts = np.bincount(data.train.labels, minlength=len(data.classes))
    empty = [name for name in classes if counts[data.classes.index(name)] == 0]
    if empty:
        raise DataError(f"class(es) {', '.join(empty)} of protocol_a.datasets.{dataset} have no training images")
    defective = None if data.test.kinds is None else np.array([k != "good" for k in data.test.kinds])
    for name in classes:
        _, anomalous = class_targets(data.test.labels, data.classes.index(name), defective)
        if anomalous.all() or not anomalous.any():
            lacking = "normal" if anomalous.all() else "anomalous"
            raise DataError(f"protocol_a.datasets.{dataset} class {name}: the test split holds no {lacking} images "
                            "for it; image ROC AUC needs both")
    return {"classes": classes, "train": len(data.train), "test": len(data.test)}


def selected_classes(data: ClassificationSplits, ds: ClassificationDatasetConfig) -> list[str]:
    """The classes that take a turn as the normal class."""
    return _pick(list(data.classes), ds)


def _pick(classes: list[str], ds: ClassificationDatasetConfig) -> list[str]:
    wanted = classes if ds.classes == "all" else list(ds.classes)
    missing = [c for c in wanted if c not in classes]
    if missing:
        raise DataError(f"params key 'protocol_a.datasets.{ds.name}.classes': {', '.join(missing)} not in the "
                        f"dataset; its classes are {', '.join(classes)}")
    return wanted


def _samples(split: ClassSplit, classes: tuple[str, ...], split_name: str) -> list[Sample]:
    if split.kinds is not None:  # image-level MVTec: keep each image's defect type
        return [Sample(p, int(y), k) for p, y, k in zip(split.images, split.labels, split.kinds, strict=True)]
    if isinstance(split.images, list):
        return [Sample(p, int(y), classes[int(y)]) for p, y in zip(split.images, split.labels, strict=True)]
    return [Sample(Path(f"{split_name}/{i}"), int(y), classes[int(y)]) for i, y in enumerate(split.labels)]


def _raw_images(data: ClassificationSplits):
    """The in-memory images of samples named ``<split>/<index>`` by :func:`_samples`, as stored."""
    def raw(samples: list[Sample]) -> np.ndarray:
        return np.stack([getattr(data, s.path.parent.name).images[int(s.path.name)] for s in samples])

    return raw


def _array_loader(data: ClassificationSplits, geometry: Geometry):
    """Loader of in-memory images, resized and cropped."""
    raw = _raw_images(data)

    def load(samples: list[Sample]) -> np.ndarray:
        return np.stack([resize_crop(image, geometry) for image in raw(samples)])

    return load


def _digest(data: ClassificationSplits) -> str:
    """Content hash of in-memory images and labels (file-based images are hashed per file)."""
    h = hashlib.sha256()
    for split in (data.train, data.test):
        if not isinstance(split.images, list):
            h.update(np.ascontiguousarray(split.images).tobytes())
        h.update(split.labels.tobytes())
    return h.hexdigest()[:24]


def run_extract_a(params: Params, dataset: str, progress: bool = True) -> dict[str, int]:
    """Pooled features of every train and test image of a Protocol A dataset into one store."""
    check_model_name(params.backbone.name)
    ds, data, _ = _load_declared(params, dataset)
    samples = {"train": _samples(data.train, data.classes, "train"), "test": _samples(data.test, data.classes, "test")}
    b, e, a = params.backbone, params.extract, params.protocol_a
    geometry = Geometry(a.resize, a.crop)
    extractor = build_pooled_extractor(b.name, b.weights, b.mean, b.std)
    spec = extractor.spec(a.crop)
    store_layout = fs.StoreLayout(spec.channels, 1, 1, a.crop, "float32", max(e.shard_images, 64), e.compressor,
                                  e.level, image_level=True)
    in_memory = not isinstance(data.train.images, list)
    device = pick_device(e.device, "extract.device")
    backbone = {"name": b.name, "weights": b.weights, "pooled": True, "mean": list(spec.mean),
                "std": list(spec.std), "classes": list(data.classes), "dataset_format": ds.format,
                "data_digest": _digest(data)}
    final = layout.feature_store(params, dataset, STORE_NAME)
    partial = layout.partial_store(params, dataset, STORE_NAME)
    if e.scheduler != "inprocess":
        # Imported here: dask's import costs every stage that imports this module (train, score) a second or so.
        from polarocc.features.distributed import WorkerSpec, cluster_client, extract_category_distributed

        worker = WorkerSpec(b.name, (), 0, b.weights, tuple(spec.mean), tuple(spec.std), geometry.record(),
                            e.batch_size, "float32", device, pooled=True)
        with cluster_client(e.scheduler, e.workers, e.threads_per_worker, gpu=device == "cuda") as client:
            return extract_category_distributed(client, worker, samples, store_layout, backbone, final, partial,
                                                progress, _raw_images(data) if in_memory else None)
    runner = CategoryExtractor(extractor, geometry, e.batch_size, "float32", device,
                               loader=_array_loader(data, geometry) if in_memory else None)
    return extract_category(runner, samples, store_layout, backbone, final, partial, progress)


def load_split(store: FeatureStore, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pooled features (N, C, 1, 1) float32, class indices (N,) and defect flags (N,) of a split."""
    features = np.asarray(store.features(split)[:], dtype=np.float32)
    samples = store.samples(split)
    labels = np.array([s.label for s in samples], dtype=np.int64)
    classes = store.attrs["backbone"]["classes"]
    # A defect type other than the class name marks an image-level MVTec defect ('good' is normal).
    defective = np.array([s.defect_type not in ("good", classes[s.label]) for s in samples], dtype=bool)
    return features, labels, defective


def train_config(params: Params) -> TrainConfig:
    """The training settings of Protocol A: ``train`` with Protocol A's epochs and batch size."""
    return replace(params.train, epochs=params.protocol_a.epochs, batch_size=params.protocol_a.batch_size)


def class_features(features: np.ndarray, labels: np.ndarray, label: int) -> np.ndarray:
    """The training features of one class (the normal class of a one-vs-rest model)."""
    own = features[labels == label]
    if len(own) == 0:
        raise DataError(f"class index {label} has no training images")
    return own


def class_center(own: np.ndarray, distribution: str, norm: float, seed: int) -> torch.Tensor:
    """The center of a Protocol A variant: ``feature_mean`` is the mean of the class's own training features."""
    return make_center(distribution, norm, own.shape[1], seed, feature_mean=lambda: own.mean(axis=(0, 2, 3)))


def fit_class(features: np.ndarray, labels: np.ndarray, label: int, params: Params, norm: float,
              distribution: str, on_step: Callable[[int, Projector], None] | None = None,
              ) -> tuple[Projector, torch.Tensor, TrainHistory]:
    """Train on one class's training images (direct trainer: one feature vector per image).

    ``on_step(images_seen, projector)`` runs after every step. The same computation as :func:`fit_variants`
    with one distribution (so a model trained here is the one :func:`fit_all` trains for it).
    """
    observer = None if on_step is None else lambda _, seen, projector: on_step(seen, projector)
    return fit_variants(features, labels, label, params, norm, (distribution,), observer)[0]


def step_flop(variants: int, batch_size: int, channels: int) -> float:
    """FLOP of one lockstep step on pooled features: the forward product and the weight gradient, each
    2 B C^2 per variant (the Adam update, ~10 C^2 per variant, is memory-bound and left out)."""
    return 4.0 * variants * batch_size * channels * channels


def fit_variants(features: np.ndarray, labels: np.ndarray, label: int, params: Params, norm: float,
                 distributions: tuple[str, ...] | list[str],
                 on_step: Callable[[int, int, Projector], None] | None = None,
                 ) -> list[tuple[Projector, torch.Tensor, TrainHistory]]:
    """Train one projector per center distribution on one class's training images, in lockstep (they share
    the batches: same seed, same images) with :func:`train_direct_lockstep`; (projector, center, history) per
    distribution. ``on_step(variant, images_seen, projector)`` runs after every step for every variant.

    Small problems run on one torch thread (:func:`threads_for`): splitting their ops costs more than it gives,
    most of all while another process keeps the cores busy.
    """
    own = class_features(features, labels, label)
    cfg = train_config(params)
    with torch_threads(threads_for(step_flop(len(distributions), min(cfg.batch_size, len(own)), own.shape[1]))):
        return _train_variants(own, label, params, norm, tuple(distributions), on_step)


def _train_variants(own: np.ndarray, label: int, params: Params, norm: float, distributions: tuple[str, ...],
                    on_step: Callable[[int, int, Projector], None] | None = None,
                    ) -> list[tuple[Projector, torch.Tensor, TrainHistory]]:
    """:func:`fit_variants` on the class's own features ``own``, with the caller's torch thread setting."""
    cfg = train_config(params)
    centers = [class_center(own, d, norm, params.center.seed) for d in distributions]
    projectors = [Projector(own.shape[1], params.projector.kind, params.projector.bias, seed=cfg.seed)
                  for _ in distributions]
    observer = None if on_step is None else lambda v, seen: on_step(v, seen, projectors[v])
    try:
        histories = train_direct_lockstep(projectors, centers, lambda idx: own[np.sort(idx)], len(own), cfg,
                                          on_step=observer)
    except VariantLossDiverged as exc:
        raise NumericalError(f"Protocol A class index {label} with the {distributions[exc.index]} center of norm "
                             f"{norm:g}: {exc}; lower the norm or the learning rate") from exc
    return list(zip(projectors, centers, histories, strict=True))


@torch.no_grad()
def score_class(features: np.ndarray, labels: np.ndarray, label: int, projector: Projector, center: torch.Tensor,
                squared: bool = True, defective: np.ndarray | None = None) -> dict:
    """Image ROC AUC of one-vs-rest (the class against every other test image) or, when ``defective`` flags
    are given (image-level MVTec), of the class's own test images, good against defective."""
    rows, anomalous = class_targets(labels, label, defective)
    z, distances = project(projector, center, torch.from_numpy(features[rows]), squared)
    scores = distances[:, 0, 0].numpy()
    polar = PolarAccumulator(center)
    polar.add(z, torch.from_numpy(np.where(anomalous == 1, ANOMALOUS, NORMAL)[:, None, None]))
    return {**image_metrics(anomalous, scores), "polar": polar.summary()}


def image_metrics(anomalous: np.ndarray, scores: np.ndarray) -> dict:
    """Protocol A's metrics of image scores against 0/1 anomalous flags (no pixel metrics)."""
    from polarocc.scoring.metrics import f1_max, image_auroc  # here: scikit-learn's import would cost train a second

    return {"protocol": "A", "image_auroc": image_auroc(anomalous, scores), "pixel_auroc": None,
            "aupro": None, "image_f1_max": f1_max(anomalous, scores), "pixel_f1_max": None,
            "n_test": len(anomalous), "n_anomalous": int(anomalous.sum())}


def class_targets(labels: np.ndarray, label: int, defective: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(test rows scored, 0/1 anomalous flags of those rows) for class ``label`` as the normal class:
    every test image one-vs-rest, or (image-level MVTec, ``defective`` given) the class's own images."""
    if defective is not None:
        rows = labels == label
        return rows, defective[rows].astype(np.int64)
    return np.ones(len(labels), dtype=bool), (labels != label).astype(np.int64)


def chosen_classes(store: FeatureStore, ds: ClassificationDatasetConfig) -> list[tuple[str, int]]:
    """(name, index) of each class that takes a turn as the normal class, from the store's class list."""
    classes = list(store.attrs["backbone"]["classes"])
    return [(name, classes.index(name)) for name in _pick(classes, ds)]


def fit_all(params: Params, norm: float):
    """Yield (distribution, dataset, class name, store, projector, center, history) for every Protocol A model.

    The distributions of a class train in lockstep (:func:`fit_variants`); models come class by class. Classes
    train side by side, one per core with one torch thread each (:func:`split_threads`), when a class's steps
    are large enough for :func:`threads_for` to give it every core: independent loops do not wait for each
    other, so a core taken by another process slows one class instead of every op. Each class computes exactly
    what :func:`fit_variants` computes for it alone. The thread setting holds until the generator is exhausted.
    """
    distributions = tuple(params.sweep.distributions)
    cfg = train_config(params)
    for dataset, ds in params.protocol_a.datasets.items():
        store = FeatureStore(layout.feature_store(params, dataset, STORE_NAME))
        features, labels, _ = load_split(store, "train")
        classes = chosen_classes(store, ds)
        largest = max((int((labels == label).sum()) for _, label in classes), default=1)
        flop = step_flop(len(distributions), min(cfg.batch_size, largest), features.shape[1])
        workers, threads = split_threads(threads_for(flop), len(classes))

        def train(label: int, features: np.ndarray = features, labels: np.ndarray = labels,
                  ) -> list[tuple[Projector, torch.Tensor, TrainHistory]]:
            return _train_variants(class_features(features, labels, label), label, params, norm, distributions)

        with torch_threads(threads), closing(in_order(train, [label for _, label in classes], workers)) as results:
            for (name, _), fitted in zip(classes, results, strict=True):
                for distribution, (projector, center, history) in zip(distributions, fitted, strict=True):
                    yield distribution, dataset, name, store, projector, center, history


def score_all(params: Params, norm: float) -> dict:
    """results[distribution][dataset][class] of every Protocol A model at ``norm``.

    Classes are scored side by side like :func:`fit_all` trains them (one torch thread each when a model's
    products are large enough for every core); the results are those of scoring them in turn.
    """
    results: dict[str, dict] = {}
    for dataset, ds in params.protocol_a.datasets.items():
        store = FeatureStore(layout.feature_store(params, dataset, STORE_NAME))
        features, labels, defective = load_split(store, "test")
        within = defective if ds.format == "mvtec" else None
        classes = chosen_classes(store, ds)
        flop = 2.0 * len(features) * features.shape[1] ** 2  # one model's product z = F W^T over the test split
        workers, threads = split_threads(threads_for(flop), len(classes))

        def score(item: tuple[str, int], dataset: str = dataset, store: FeatureStore = store,
                  features: np.ndarray = features, labels: np.ndarray = labels,
                  within: np.ndarray | None = within) -> dict[str, dict]:
            name, label = item
            scored = {}
            for distribution in params.sweep.distributions:
                projector, center, _ = load_model(layout.model_file(params, norm, distribution, dataset, name), store)
                scored[distribution] = score_class(features, labels, label, projector, center, params.score.squared,
                                                   within)
            return scored

        with torch_threads(threads), closing(in_order(score, classes, workers)) as scored:
            for (name, _), per_distribution in zip(classes, scored, strict=True):
                for distribution, result in per_distribution.items():
                    results.setdefault(distribution, {}).setdefault(dataset, {})[name] = result
    return results
