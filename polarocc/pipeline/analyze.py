"""Stage ``analyze``: what the pipeline's headline numbers do not show.

Pre-trained cosine similarities for the feasibility report, AUROC against the training epoch with and
without the bias (an analysis of the budget, never used to pick the reported model), t-SNE of projected
features per center distribution, and anomaly-map overlays of a fixed selection of test images.
"""

from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import torch
from tqdm import tqdm

from polarocc import layout
from polarocc.analysis.cosine import store_cosines, vector_cosines
from polarocc.analysis.polar import ANOMALOUS, NORMAL, store_position_labels
from polarocc.atomic import write_json
from polarocc.config import Params
from polarocc.data.images import load_image
from polarocc.detector import protocol_a
from polarocc.detector.artefact import load_artefact
from polarocc.detector.curves import LearningCurve
from polarocc.detector.model_files import load_model
from polarocc.detector.stores import defect_type_pixel_metrics, fit_store
from polarocc.device import pick_device
from polarocc.features.store import FeatureStore
from polarocc.models.projector import Projector
from polarocc.reports.figures import overlay_grid, tsne_plot
from polarocc.scoring.maps import project, score_batch
from polarocc.training.progress import ImagesSeen, both


def _with_bias(params: Params, bias: bool) -> Params:
    return replace(params, projector=replace(params.projector, bias=bias))


def budget_category(store: FeatureStore, params: Params, bias: bool, progress: bool = False) -> list[dict]:
    """Test AUROC of the default variant after each of ``analysis.budget_epochs`` (bias on or off), on a seeded
    sample of about ``analysis.budget_test_images`` test images."""
    n = store.features("train").shape[0]
    a = params.analysis
    epochs = [e for e in a.budget_epochs if e <= params.train.epochs]
    c = params.center
    center = store.centers((c.distribution,), c.norm, c.seed)[c.distribution]
    curve = LearningCurve(store, center, params.score, [e * n for e in epochs], sample_images=a.budget_test_images,
                          seed=params.train.seed, whole_split_at_end=False)
    with tqdm(total=n * params.train.epochs, desc=f"  {store.path.stem} budget, bias {bias}", unit="image",
              unit_scale=True, leave=False, disable=not progress) as bar:
        fit_store(store, _with_bias(params, bias), c.norm, (c.distribution,),
                  on_step=both(curve, ImagesSeen(bar, [c.distribution])))
    return [{"epoch": seen // n, **point} for seen, point in sorted(curve.points.items())]


class _EpochScorer:
    """Counts optimizer steps and scores a copy of the model at the chosen epoch ends."""

    def __init__(self, evaluate, steps_per_epoch: int, epochs: set[int]) -> None:
        self.evaluate, self.steps_per_epoch, self.epochs = evaluate, steps_per_epoch, epochs
        self.steps = 0
        self.points: list[dict] = []

    def __call__(self, seen: int, projector: Projector) -> None:
        self.steps += 1
        epoch, rest = divmod(self.steps, self.steps_per_epoch)
        if rest == 0 and epoch in self.epochs:
            self.points.append({"epoch": epoch, "image_auroc": self.evaluate(projector)["image_auroc"],
                                "pixel_auroc": None})


def budget_classes(params: Params, dataset: str, bias: bool) -> dict[str, list[dict]]:
    """The same for every class of a Protocol A dataset (image AUROC only)."""
    ds = params.protocol_a.datasets[dataset]
    store = FeatureStore(layout.feature_store(params, dataset, protocol_a.STORE_NAME))
    train, train_labels, _ = protocol_a.load_split(store, "train")
    test, test_labels, defective = protocol_a.load_split(store, "test")
    within = defective if ds.format == "mvtec" else None
    epochs = {e for e in params.analysis.budget_epochs if e <= params.protocol_a.epochs}
    out = {}
    for name, label in protocol_a.chosen_classes(store, ds):
        own = protocol_a.class_features(train, train_labels, label)
        center = protocol_a.class_center(own, params.center.distribution, params.center.norm, params.center.seed)
        scorer = _EpochScorer(lambda projector, label=label, center=center: protocol_a.score_class(
            test, test_labels, label, copy.deepcopy(projector), center, params.score.squared, within),
            -(-len(own) // params.protocol_a.batch_size), epochs)

        protocol_a.fit_class(train, train_labels, label, _with_bias(params, bias), params.center.norm,
                             params.center.distribution, scorer)
        out[name] = scorer.points
    return out


def _tsne_sample(store: FeatureStore, count: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """A fixed sample of normal and anomalous test feature positions (half each where possible), read one
    shard at a time so only the sampled vectors are held."""
    flat_labels = store_position_labels(store).reshape(-1).numpy()
    rng = np.random.default_rng(seed)
    chosen = []
    for kind in (NORMAL, ANOMALOUS):
        where = np.flatnonzero(flat_labels == kind)
        chosen.append(rng.choice(where, min(len(where), count // 2), replace=False))
    index = np.sort(np.concatenate(chosen))
    vectors = []
    for indices, features in store.batches("test"):
        batch = torch.from_numpy(np.asarray(features, dtype=np.float32))
        flat = batch.permute(0, 2, 3, 1).reshape(-1, batch.shape[1])
        first = int(indices[0]) * store.pixels_per_image
        inside = index[(index >= first) & (index < first + len(flat))]
        vectors.append(flat[inside - first])
    return torch.cat(vectors)[:, :, None, None], (flat_labels[index] == ANOMALOUS).astype(int)


def tsne_inputs(params: Params, dataset: str) -> tuple[str, dict[str, np.ndarray], np.ndarray]:
    """(what was embedded, projected features per center distribution, anomalous flags) at the default norm,
    for the dataset's first category (Protocol B) or first class (Protocol A)."""
    seed = params.center.seed
    if dataset in params.datasets:
        category = params.datasets[dataset].categories[0]
        store = FeatureStore(layout.feature_store(params, dataset, category))
        features, anomalous = _tsne_sample(store, params.analysis.tsne_points, seed)
        title = f"{dataset}/{category}: test feature positions"
    else:
        store = FeatureStore(layout.feature_store(params, dataset, protocol_a.STORE_NAME))
        test, test_labels, _ = protocol_a.load_split(store, "test")
        category, label = protocol_a.chosen_classes(store, params.protocol_a.datasets[dataset])[0]
        rng = np.random.default_rng(seed)
        index = np.sort(rng.choice(len(test), min(len(test), params.analysis.tsne_points), replace=False))
        features, anomalous = torch.from_numpy(test[index]), (test_labels[index] != label).astype(int)
        title = f"{dataset}: class {category} normal, the other classes anomalous"
    projected = {}
    for distribution in params.sweep.distributions:
        projector, center, _ = load_model(layout.model_file(params, params.center.norm, distribution, dataset,
                                                           category), store)
        z, _ = project(projector, center, features.float())
        projected[distribution] = z.flatten(1).numpy()
    return title, projected, anomalous


def overlays(params: Params, dataset: str, category: str) -> None:
    """Overlays of the default model on a fixed selection: the first image of each defect type (sorted),
    then the first good image, ``analysis.overlays_per_category`` in all, coloured on the model's normal-map
    scale, with the test masks as ground truth."""
    store = FeatureStore(layout.feature_store(params, dataset, category))
    artefact = load_artefact(layout.deploy_model(params, dataset, category))
    samples = store.samples("test")
    firsts: dict[str, int] = {}
    for i, s in enumerate(samples):
        firsts.setdefault(s.defect_type, i)
    picks = [i for t, i in sorted(firsts.items()) if t != "good"][:params.analysis.overlays_per_category - 1]
    picks.append(firsts.get("good", 0))
    # Only the chosen images are read and scored.
    features = torch.from_numpy(np.concatenate([store.features("test")[i:i + 1] for i in picks]))
    s = params.score
    geometry = artefact.input_geometry
    maps, scores = score_batch(artefact.build_projector(), artefact.center, features, geometry.size,
                               s.sigma, s.reduction, s.topk, s.squared)
    images = [load_image(samples[i].path, geometry) for i in picks]
    titles = [f"{samples[i].defect_type}/{samples[i].path.name}" for i in picks]
    # Ground truth where the category has it (a good image's empty mask included); an image-level category none.
    masks = [store.masks(slice(i, i + 1))[0] for i in picks] if store.has_masks else None
    overlay_grid(images, list(maps.float().numpy()), [float(v) for v in scores], artefact.threshold.value, titles,
                 layout.overlay_plot(params, dataset, category), map_scale=artefact.map_scale,
                 normal_scores=artefact.normal_scores, masks=masks)


def run_analyze(params: Params, progress: bool = True) -> dict:
    """Write reports/analysis/{cosines,budget,defect_types}.json, the t-SNE figures and the overlays."""
    torch.set_num_threads(os.cpu_count() or 1)
    seed = params.center.seed
    cosines: dict[str, dict] = {}
    budget: dict[str, dict] = {}
    defect_types: dict[str, dict] = {}
    c = params.center
    device = pick_device(params.score.device, "score.device")
    jobs = [(d, c) for d, ds in params.datasets.items() for c in ds.categories]
    for dataset, category in tqdm(jobs, desc="analyze", unit="category", disable=not progress):
        store = FeatureStore(layout.feature_store(params, dataset, category))
        cosines.setdefault(dataset, {})[category] = store_cosines(store, seed)
        budget.setdefault(dataset, {})[category] = {"bias": budget_category(store, params, True, progress),
                                                    "no_bias": budget_category(store, params, False, progress)}
        overlays(params, dataset, category)
        projector, center, _ = load_model(layout.model_file(params, c.norm, c.distribution, dataset, category), store)
        defect_types.setdefault(dataset, {})[category] = defect_type_pixel_metrics(store, projector, center,
                                                                                   params.score, device)
    for dataset, ds in params.protocol_a.datasets.items():
        store = FeatureStore(layout.feature_store(params, dataset, protocol_a.STORE_NAME))
        train, train_labels, _ = protocol_a.load_split(store, "train")
        test, test_labels, defective = protocol_a.load_split(store, "test")
        for name, label in protocol_a.chosen_classes(store, ds):
            rows, anomalous = protocol_a.class_targets(test_labels, label, defective if ds.format == "mvtec" else None)
            cosines.setdefault(dataset, {})[name] = vector_cosines(train[train_labels == label], test[rows],
                                                                   anomalous, seed)
        with_bias, without = budget_classes(params, dataset, True), budget_classes(params, dataset, False)
        budget[dataset] = {name: {"bias": with_bias[name], "no_bias": without[name]} for name in with_bias}
    for dataset in [*params.datasets, *params.protocol_a.datasets]:
        title, projected, anomalous = tsne_inputs(params, dataset)
        tsne_plot(projected, anomalous, title, seed, layout.tsne_plot(params, dataset))
    out = layout.analysis_dir(params)
    write_json(out / "cosines.json", cosines)
    write_json(out / "budget.json", budget)
    write_json(out / "defect_types.json", defect_types)
    return {"cosines": cosines, "budget": budget, "defect_types": defect_types}
