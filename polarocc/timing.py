"""Expected seconds of each pipeline stage, from the costs that ``bench/runtime.py`` measured.

A stage's time is a cost per DVC run of it (start-up, DVC's bookkeeping, and work that does not grow with the
units) plus, per part of its work, a rate (seconds per unit) times the units this configuration asks for: images
decoded, backbone pixels, training steps, scored map pixels, coreset steps x held bank vectors. Costs and rates are
fitted to two benchmark runs, a large category and the default data (``stage_costs.json``, written by
``python bench/runtime.py --write-costs``); the estimate is for a machine like the benchmark's (its cores and
clock) and is a guide to within about a factor of two, not a promise. What the units leave out scales with the
runs only: Protocol A's training, scoring and peers (the default digits), PaDiM's fit and the online stream's own
steps (counted with the scored images).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

from polarocc.config import Params
from polarocc.detector.curves import checkpoints
from polarocc.peers.patchcore import coreset_size
from polarocc.planning import RunPlan, category_counts, human_seconds

COSTS_FILE = Path(__file__).with_name("stage_costs.json")
REFERENCE_PIXELS = 224 * 224  # rates of pixel-proportional work are per 224 x 224 image


def stage_family(item: str) -> str:
    """The pipeline stage of a DVC stage item: ``train@1`` -> ``train``, ``extract@textures`` -> ``extract``."""
    return item.split("@", 1)[0]


@dataclass(frozen=True)
class Workload:
    """What a configured run processes, counted as the cost model needs it."""

    categories: tuple[tuple[str, int, int], ...]  # Protocol B (dataset, train images, test images) per category
    a_images: int  # Protocol A images (train + test; pooled vectors after extraction)
    forward_pixels: int  # backbone input pixels per Protocol B image, every tile counted
    map_pixels: int  # anomaly-map pixels per Protocol B test image
    positions: int  # feature positions per Protocol B image
    channels: int
    a_forward_pixels: int
    embedded_images: int  # images the prepare stage generates

    @property
    def b_train(self) -> int:
        return sum(train for _, train, _ in self.categories)

    @property
    def b_test(self) -> int:
        return sum(test for _, _, test in self.categories)

    @classmethod
    def of(cls, params: Params, plan: RunPlan) -> Workload:
        """The workload of ``params`` as ``plan`` (``polarocc.planning.make_plan``) counted it."""
        shape = plan.backbone
        categories = tuple((name, train, good + bad) for name in params.datasets
                           for train, good, bad in category_counts(params, name)[0].values())
        forward = shape.input_size[0] * shape.input_size[1]
        tiles = params.backbone.geometry().tiles
        if shape.tiles > 1 and tiles is not None:
            forward = shape.tiles * tiles.size ** 2
        e = params.embedded_data
        embedded = len(e.categories) * (e.train + e.test_good + e.defects_per_type * len(e.defect_types))
        a_size = params.protocol_a.crop or params.protocol_a.resize
        return cls(categories=categories, a_images=sum(d.train + d.test for d in plan.datasets if d.protocol == "A"),
                   forward_pixels=forward, map_pixels=shape.input_size[0] * shape.input_size[1],
                   positions=shape.height * shape.width, channels=shape.channels, a_forward_pixels=a_size * a_size,
                   embedded_images=embedded)


def _curve_images(test: int, marks: int, sample: int, whole_split_at_end: bool = True) -> int:
    """Test images a learning curve of ``marks`` checkpoints scores: the sample at each, and the whole split once
    more at the end when the sample is smaller (and the curve's result is reported)."""
    if not sample or sample >= test:
        return marks * test
    return marks * sample + (test if whole_split_at_end else 0)


def _patchcore_work(params: Params, w: Workload) -> tuple[float, float]:
    """PatchCore's (coreset steps x held vectors x projection dimensions, test positions x bank vectors x channels)
    over the categories; zero when it is not one of the peers."""
    pe = params.peers
    coreset = search = 0.0
    if "patchcore" not in pe.methods:
        return coreset, search
    for _, train, test in w.categories:
        held = min(train * w.positions, pe.bank_limit or math.inf)
        bank = coreset_size(pe.coreset_ratio, held)
        coreset += bank * held * min(pe.projection_dim, w.channels)
        search += test * w.positions * bank * w.channels
    return coreset, search


# Each part: (rate name, units of this configuration). A rate named after another stage's part reuses it.
Parts = Callable[[Params, Workload], dict[str, float]]
CHANNEL_SCALE = 176  # training steps cost ~ channels^3; rates are per 176 channels (Lite0 layers 1-3)


def _models(params: Params) -> int:
    return len(params.sweep.norms) * len(params.sweep.distributions)


def _train_units(params: Params, w: Workload, epochs: int, models: int, images: float | None = None) -> float:
    """Optimizer steps x variants x (channels / 176)^3: with stored statistics (the default) a step of the Gram
    trainer costs a few C x C matrix products per variant."""
    scale = (w.channels / CHANNEL_SCALE) ** 3
    steps = sum(math.ceil((train if images is None else images * train / max(1, w.b_train)) / params.train.batch_size)
                for _, train, _ in w.categories)
    return steps * epochs * models * scale


def _export_units(params: Params, w: Workload) -> dict[str, float]:
    """With ``deploy.holdout`` > 0 the deployed model is retrained without the held-out images, whose maps set the
    threshold; with 0 it is the sweep's model and every training image is scored for the threshold."""
    holdout = params.deploy.holdout
    if holdout > 0:
        return {"training step": _train_units(params, w, params.train.epochs, 1, w.b_train * (1 - holdout)),
                "scored map (224 px)": _map_units(w, w.b_train * holdout)}
    return {"scored map (224 px)": _map_units(w, w.b_train)}


def _map_units(w: Workload, images: float) -> float:
    return images * w.map_pixels / REFERENCE_PIXELS


STAGE_PARTS: dict[str, Parts] = {
    "validate_backbone": lambda p, w: {},
    "validate": lambda p, w: {},
    "prepare": lambda p, w: {"generated image": w.embedded_images},
    "check": lambda p, w: {"decoded image": w.b_train + w.b_test},
    "extract": lambda p, w: {"backbone image (224 px)": (w.b_train + w.b_test) * w.forward_pixels / REFERENCE_PIXELS},
    "check_a": lambda p, w: {"decoded image": w.a_images},
    "extract_a": lambda p, w: {"pooled backbone image (224 px)": w.a_images * w.a_forward_pixels / REFERENCE_PIXELS},
    "train": lambda p, w: {"training step": _train_units(p, w, p.train.epochs, _models(p))},
    "score": lambda p, w: {"scored map (224 px)": _map_units(w, w.b_test * _models(p))},
    "online": lambda p, w: {"curve map (224 px)": _map_units(w, sum(
        _curve_images(test, len(checkpoints(train)), p.protocol_c.curve_test_images)
        for dataset, train, test in w.categories if dataset in p.protocol_c.datasets))},
    "export": _export_units,
    "peers": lambda p, w: {**dict(zip(("coreset step x vector x dim", "search position x vector x channel"),
                                      _patchcore_work(p, w), strict=True)),
                           "scored map (224 px)": _map_units(w, w.b_test * len(p.peers.methods)),
                           # fitting a peer (PaDiM's per-position covariances, the bank) costs per category
                           "peer fit (category)": len(w.categories) * len(p.peers.methods)},
    "analyze": lambda p, w: {"training step": _train_units(p, w, p.train.epochs, 2),
                             "curve map (224 px)": _map_units(w, 2 * sum(
                                 _curve_images(test, len([e for e in p.analysis.budget_epochs if e <= p.train.epochs]),
                                               p.analysis.budget_test_images, False) for _, _, test in w.categories))},
    "report": lambda p, w: {},
}
# The params that shorten each stage most, for the plan's advice.
CONTROLS: dict[str, str] = {
    "prepare": "embedded_data.train/test_good/defects_per_type",
    "check": "the dataset's images",
    "extract": "backbone.resize/crop/tiles, extract.scheduler (a dask cluster)",
    "check_a": "protocol_a.datasets",
    "extract_a": "protocol_a.resize/crop",
    "train": "sweep.norms, sweep.distributions, train.epochs (the paper's 50), train.batch_size",
    "score": "sweep.norms, sweep.distributions",
    "online": "protocol_c.curve_test_images, protocol_c.datasets ([] skips it)",
    "export": "deploy.holdout (the share retrained without; 0 scores every training image instead)",
    "peers": "peers.bank_limit, peers.coreset_ratio, peers.methods",
    "analyze": "analysis.budget_test_images, analysis.budget_epochs",
}
STAGE_ORDER = tuple(STAGE_PARTS)


def stage_items(params: Params) -> dict[str, int]:
    """How many DVC stage runs each stage is (``train`` runs once per norm, ``extract`` once per dataset)."""
    return {
        "validate_backbone": 1, "validate": 1, "prepare": 1, "check": len(params.datasets),
        "extract": len(params.datasets), "check_a": len(params.protocol_a.datasets),
        "extract_a": len(params.protocol_a.datasets), "train": len(params.sweep.norms),
        "score": len(params.sweep.norms), "online": len(params.protocol_c.datasets), "export": 1,
        "peers": 1 if params.peers.methods else 0, "analyze": 1, "report": 1}


def stage_units(params: Params, workload: Workload) -> dict[str, dict[str, float]]:
    """Units of every part of every stage for this configuration (none for a stage whose work does not grow with
    the data: validation, the report)."""
    return {name: {k: float(v) for k, v in parts(params, workload).items()} for name, parts in STAGE_PARTS.items()}


@dataclass(frozen=True)
class CostModel:
    """Seconds per DVC run of each stage (``per_run``: start-up and whatever does not grow with the units) and
    seconds per unit of each part (``rates``)."""

    per_run: dict[str, float]
    rates: dict[str, float]
    source: dict[str, Any]

    @classmethod
    def load(cls, path: Path = COSTS_FILE) -> CostModel:
        """The costs shipped with polarocc (or another ``stage_costs.json``)."""
        raw = json.loads(Path(path).read_text())
        costs = raw["costs"]
        return cls({k: float(v) for k, v in costs["per_run"].items()},
                   {k: float(v) for k, v in costs["rates"].items()},
                   {k: raw[k] for k in ("source", "machine", "runs") if k in raw})

    def estimate(self, params: Params, workload: Workload) -> dict[str, dict[str, Any]]:
        """Per stage: expected ``seconds``, DVC stage ``runs`` and the params that ``controls`` its cost."""
        units, items = stage_units(params, workload), stage_items(params)
        out = {}
        for name in STAGE_ORDER:
            if not items[name]:
                continue
            work = sum(self.rates.get(part, 0.0) * amount for part, amount in units[name].items())
            out[name] = {"seconds": round(items[name] * self.per_run.get(name, 0.0) + work, 1),
                         "runs": items[name], "controls": CONTROLS.get(name, "")}
        return out


@dataclass(frozen=True)
class MeasuredRun:
    """One timed ``dvc repro``: its params, the work they asked for and {stage: {seconds, items}}."""

    params: Params
    workload: Workload
    stages: dict[str, dict[str, float]]


def _fit_line(items: list[float], units: list[float], residual: list[float]) -> tuple[float, float]:
    """(per run, per unit) >= 0 with residual ~ per_run x items + per_unit x units, exact for two runs of different
    units per run; one run (or equal ratios) puts everything on the units."""
    if len(items) >= 2:
        det = items[0] * units[1] - items[1] * units[0]
        if abs(det) > 1e-12 * max(1.0, abs(items[0] * units[1])):
            a = (residual[0] * units[1] - residual[1] * units[0]) / det
            b = (items[0] * residual[1] - items[1] * residual[0]) / det
            if a >= 0 and b >= 0:
                return a, b
    total_units = sum(u * u for u in units)
    b = max(0.0, sum(r * u for r, u in zip(residual, units, strict=True)) / total_units) if total_units else 0.0
    rest = [r - b * u for r, u in zip(residual, units, strict=True)]
    return max(0.0, sum(rest) / sum(items)), b


def calibrate(runs: list[MeasuredRun], measured_rates: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-run costs and per-unit rates that reproduce the timed ``runs`` (two runs of different sizes: the
    benchmark's large category and the default data).

    ``measured_rates`` (parts timed on their own) are kept as they are. Stage by stage in pipeline order, the parts
    that already have a rate are taken off each run's time; what is left is split into a cost per stage run and a
    rate for the stage's new parts (together, as one) that reproduce both runs. A stage with no new part gets
    only its per-run cost (the mean over the runs).
    """
    rates: dict[str, float] = dict(measured_rates or {})
    per_run: dict[str, float] = {}
    for name in STAGE_ORDER:
        timed = [r for r in runs if name in r.stages and r.stages[name]["items"]]
        if not timed:
            continue
        units = [stage_units(r.params, r.workload)[name] for r in timed]
        items = [float(r.stages[name]["items"]) for r in timed]
        residual = [r.stages[name]["seconds"] - sum(rates[k] * v for k, v in u.items() if k in rates)
                    for r, u in zip(timed, units, strict=True)]
        new = sorted({k for u in units for k, v in u.items() if k not in rates and v > 0})
        if not new:
            per_run[name] = max(0.0, sum(residual) / sum(items))
            continue
        a, b = _fit_line(items, [sum(u.get(k, 0.0) for k in new) for u in units], residual)
        per_run[name] = a
        rates.update(dict.fromkeys(new, b))
    return {"per_run": per_run, "rates": rates}


@cache
def shipped_costs() -> CostModel:
    """The cost model that ships with polarocc (``stage_costs.json``)."""
    return CostModel.load()


LONG_STAGE_SECONDS = 30 * 60  # a stage expected to run longer gets a note naming the params that shorten it


def with_stage_times(params: Params, plan: RunPlan, costs: CostModel | None = None) -> RunPlan:
    """``plan`` with the expected seconds of every stage (the shipped cost model unless ``costs``), and a note for
    each stage expected to run longer than half an hour, naming the params that shorten it."""
    if costs is None:
        try:
            costs = shipped_costs()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged or missing stage_costs.json
            return replace(plan, notes=[*plan.notes, f"no time estimates: {COSTS_FILE} is unreadable ({exc!r}); "
                                        "rerun `python bench/runtime.py --write-costs`"])
    stages = costs.estimate(params, Workload.of(params, plan))
    notes = list(plan.notes)
    for name, stage in stages.items():
        if stage["seconds"] > LONG_STAGE_SECONDS:
            notes.append(f"{name} is expected to take {human_seconds(stage['seconds'])}; shorter with "
                         f"{stage['controls']}")
    return replace(plan, stages=stages, timing_source=costs.source, notes=notes)
