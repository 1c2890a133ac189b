"""Stage ``peers``: PatchCore- and PaDiM-style detectors and the untrained projector, on the same cached
features and with the same maps, smoothing, reductions and metrics as the trained projector."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.atomic import write_json
from polarocc.config import Params
from polarocc.detector import protocol_a
from polarocc.detector.stores import category_metrics, pixel_accumulators
from polarocc.device import pick_device
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.peers.padim import PaDiM
from polarocc.peers.patchcore import PatchCore
from polarocc.scoring.maps import finish_maps, project


class UntrainedProjector:
    """The control: the projector as initialised, before any training, with the default center."""

    def __init__(self, params: Params, center: torch.Tensor) -> None:
        self.projector = Projector(center.numel(), params.projector.kind, params.projector.bias, seed=params.train.seed)
        self.center = center
        self.squared = params.score.squared

    def distance_maps(self, features: torch.Tensor) -> torch.Tensor:
        return project(self.projector, self.center, features.float(), self.squared)[1]


def fit_peer(method: str, params: Params, train_batches: Iterable[np.ndarray], center: torch.Tensor,
             image_level: bool, device: str = "cpu", progress: str | None = None,
             ) -> UntrainedProjector | PaDiM | PatchCore:
    """A fitted peer from normal training features given as an iterable of (B, C, h, w) arrays; ``center`` is the
    default variant's (used by the untrained projector). PatchCore selects its coreset and searches on ``device``;
    ``progress`` labels its coreset's progress bar."""
    pe = params.peers
    if method == "untrained":
        return UntrainedProjector(params, center)
    if method == "padim":
        peer = PaDiM(pe.padim_channels or None, pe.padim_covariance, pe.padim_eps, params.center.seed)
        for batch in train_batches:
            peer.partial_fit(torch.from_numpy(np.asarray(batch)))
        return peer.finalize()
    # One vector per image (Protocol A) makes a small bank: keep it whole, thin only patch banks.
    peer = PatchCore(pe.coreset_ratio, pe.k, pe.projection_dim, params.center.seed, thin=not image_level,
                     bank_limit=pe.bank_limit, device=device, progress=progress)
    return peer.fit(torch.from_numpy(np.asarray(b, dtype=np.float32)) for b in train_batches)


def peer_category(store: FeatureStore, params: Params, method: str, device: str = "cpu",
                  progress: bool = False) -> dict:
    """Metrics of one peer on one Protocol B category."""
    size = store.geometry.size
    s = params.score
    c = params.center
    label = f"  {method} {store.path.stem}"
    train = store.features("train").shape[0]
    # The untrained projector reads no training features: no bar for it.
    with tqdm(total=train, desc=f"{label} fit", unit="image", leave=False,
              disable=not progress or method == "untrained") as bar:
        peer = fit_peer(method, params, _counted(store.batches("train"), bar),
                        store.centers((c.distribution,), c.norm, c.seed)[c.distribution], False, device,
                        label if progress else None)
    [pixel] = pixel_accumulators(store, 1, s)
    scores = []
    test = store.features("test").shape[0]
    with tqdm(total=test, desc=f"{label} score", unit="image", leave=False, disable=not progress) as bar:
        for indices, features in store.batches("test"):
            batch_maps, batch_scores = finish_maps(peer.distance_maps(torch.from_numpy(features)), size, s.sigma,
                                                   s.reduction, s.topk)
            pixel.add(batch_maps.float().numpy(), store.masks(slice(int(indices[0]), int(indices[-1]) + 1)))
            scores.append(batch_scores.double().numpy())
            bar.update(len(indices))
    return category_metrics(store, np.concatenate(scores), pixel.result())


def _counted(batches: Iterable[tuple[np.ndarray, np.ndarray]], bar: tqdm) -> Iterator[np.ndarray]:
    """The feature arrays of ``batches``, advancing ``bar`` by each batch's images."""
    for indices, features in batches:
        yield features
        bar.update(len(indices))


def peer_classes(params: Params, dataset: str, method: str) -> dict[str, dict]:
    """Metrics of one peer on every chosen class of a Protocol A dataset."""
    ds = params.protocol_a.datasets[dataset]
    store = FeatureStore(layout.feature_store(params, dataset, protocol_a.STORE_NAME))
    train, train_labels, _ = protocol_a.load_split(store, "train")
    test, test_labels, defective = protocol_a.load_split(store, "test")
    out = {}
    for name, label in protocol_a.chosen_classes(store, ds):
        own = protocol_a.class_features(train, train_labels, label)
        c = params.center
        peer = fit_peer(method, params, [own], protocol_a.class_center(own, c.distribution, c.norm, c.seed), True)
        rows, anomalous = protocol_a.class_targets(test_labels, label, defective if ds.format == "mvtec" else None)
        scores = peer.distance_maps(torch.from_numpy(test[rows]))[:, 0, 0].double().numpy()
        out[name] = protocol_a.image_metrics(anomalous, scores)
    return out


def run_peers(params: Params, progress: bool = True) -> dict:
    """results[method][dataset][category] for every peer, dataset and category; writes reports/peers.json."""
    torch.set_num_threads(os.cpu_count() or 1)
    device = pick_device(params.score.device, "score.device")
    results: dict[str, dict] = {}
    jobs = [(m, d, c) for m in params.peers.methods for d, ds in params.datasets.items() for c in ds.categories]
    for method, dataset, category in tqdm(jobs, desc="peers", unit="category", disable=not progress):
        store = FeatureStore(layout.feature_store(params, dataset, category))
        results.setdefault(method, {}).setdefault(dataset, {})[category] = peer_category(store, params, method,
                                                                                         device, progress)
    for method in params.peers.methods:
        for dataset in params.protocol_a.datasets:
            results.setdefault(method, {})[dataset] = peer_classes(params, dataset, method)
    write_json(layout.peers_report(params), {"results": results})
    return results
