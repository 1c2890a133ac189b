"""Typed view of params.yaml, validated before any expensive work starts.

Every field of every section carries a declarative constraint (``CONSTRAINTS``, in the spirit of
scikit-learn's ``_parameter_constraints``), so each key is checked by construction; the few rules that tie
keys together follow in :func:`_check_consistency`. Every failure raises :class:`ConfigError` naming the key
(``section.key``) and what to change, so a bad sweep stops in the first stage instead of after feature
extraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from ruamel.yaml import YAML, YAMLError

from polarocc.errors import ConfigError
from polarocc.geometry import SIDES, GeometrySpec
from polarocc.ownership import is_plain_name

DISTRIBUTIONS = ("normal", "uniform", "ones", "feature_mean")
REDUCTIONS = ("max", "mean", "topk")
PROJECTORS = ("conv1x1", "linear")
TRAINERS = ("gram", "direct")
STATISTICS = ("auto", "stored", "streamed")
DATASET_FORMATS = ("mvtec",)
CLASSIFICATION_FORMATS = ("digits", "cifar10", "cifar100", "fashion_mnist", "image_folder", "mvtec")
FEATURE_DTYPES = ("float16", "float32")
COMPRESSORS = ("lz4", "zstd", "blosc", "none")
DEVICES = ("auto", "cpu", "cuda")
PEER_METHODS = ("patchcore", "padim", "untrained")
EMBEDDED_CATEGORIES = ("brick", "grass", "gravel")  # scikit-image's texture photos (polarocc.data.textures)
DEFECT_TYPES = ("scratch", "hole", "stain", "patch")
SMALL_DEFECT_TYPES = ("tiny", "small", "border", "medium")  # named by what they test (polarocc.data.textures)
# Each variant of the embedded data and the defect types it makes; the first is the default.
VARIANT_DEFECT_TYPES = {"textures": DEFECT_TYPES, "small_defects": SMALL_DEFECT_TYPES}
SMALL_DEFECTS_MIN_SIZE = 32  # below it the variant's images are too few rows for tiny < small < medium


@dataclass(frozen=True)
class Rule:
    """A constraint on one params value: ``test(value)`` is true when it is valid; ``expected`` says what a valid
    value is, for the error message."""

    test: Callable[[Any], bool]
    expected: str
    item: Rule | None = None  # for lists: the rule of each item, so an error can name the bad one


def violation(rule: Rule, value: Any, key: str, label: str = "params key") -> str | None:
    """None when ``value`` satisfies ``rule``; else the error message, naming ``key`` (or ``key[i]`` for the first
    bad item of a list) as a ``label``."""
    if rule.test(value):
        return None
    if rule.item is not None and isinstance(value, tuple):
        for i, item in enumerate(value):
            if not rule.item.test(item):
                return f"{label} '{key}[{i}]' must be {rule.item.expected}, got {item!r}"
    shown = list(value) if isinstance(value, tuple) else value
    return f"{label} '{key}' must be {rule.expected}, got {shown!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int | None = None, high: int | None = None) -> Rule:
    """An integer (never a bool) in [low, high]."""
    if low == 1 and high is None:
        expected = "a positive integer"
    else:
        expected = "an integer" + ("" if low is None else f" >= {low}") + ("" if high is None else f" <= {high}")
    return Rule(lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high), expected)


def real(low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> Rule:
    """A finite number in the interval given by ``low``/``high`` (open ends where asked)."""
    def test(v: Any) -> bool:
        return (_is_real(v) and (low is None or (v > low if low_open else v >= low))
                and (high is None or (v < high if high_open else v <= high)))

    if low is None and high is None:
        interval = ""
    else:
        interval = " in " + ("(" if low_open or low is None else "[") + ("-inf" if low is None else f"{low:g}") + \
            ", " + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None else "]")
    return Rule(test, f"a finite number{interval}")


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false (unquoted)")
SEED = integer(0, 2**32 - 1)  # numpy, torch and scikit-learn all take seeds in this range
POSITIVE = integer(1)
PATH = Rule(lambda v: isinstance(v, Path) and str(v) != "", "a path")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
SAFE_NAME = Rule(is_plain_name, "a plain name (letters, digits, '_', '-', '.', '+' or spaces; no '/' or '..')")
# Dataset names also become arguments of dvc.yaml's stage commands: no spaces.
DATASET_NAME = Rule(lambda v: is_plain_name(v, spaces=False),
                    "a plain name without spaces (letters, digits, '_', '-', '.', '+'; no '/' or '..')")


def one_of(*choices: str) -> Rule:
    """One of the given strings."""
    return Rule(lambda v: isinstance(v, str) and v in choices, "one of " + ", ".join(choices))


def optional(rule: Rule) -> Rule:
    """``rule`` or null."""
    return Rule(lambda v: v is None or rule.test(v), f"null or {rule.expected}", rule.item)


def either(*rules: Rule) -> Rule:
    """Any of ``rules``."""
    items = [r.item for r in rules if r.item is not None]
    return Rule(lambda v: any(r.test(v) for r in rules), " or ".join(r.expected for r in rules),
                items[0] if len(items) == 1 else None)


def list_of(item: Rule, min_len: int = 1, max_len: int | None = None, unique: bool = True,
            increasing: bool = False) -> Rule:
    """A list of values that each satisfy ``item``."""
    def test(v: Any) -> bool:
        if not isinstance(v, tuple) or len(v) < min_len or (max_len is not None and len(v) > max_len):
            return False
        if not all(item.test(x) for x in v):
            return False
        if unique and len({repr(x) for x in v}) != len(v):
            return False
        return not increasing or list(v) == sorted(v)

    size = f"{min_len}" if max_len == min_len else (f"at least {min_len}" if min_len else "any number of")
    order = ", increasing" if increasing else ""
    return Rule(test, f"a list of {size} item(s){' without repeats' if unique else ''}{order}, each {item.expected}",
                item)


MAPPING = Rule(lambda v: isinstance(v, dict), "a mapping of dataset names to their settings")
SCHEDULER = Rule(lambda v: isinstance(v, str) and (v in ("inprocess", "local") or "://" in v),
                 "inprocess, local or a dask scheduler address such as tcp://host:8786")
NORM = real(0, low_open=True)
SIDE_RESIZE = Rule(lambda v: isinstance(v, dict) and len(v) == 1 and next(iter(v)) in SIDES
                   and _is_int(next(iter(v.values()))) and next(iter(v.values())) > 0,
                   "{shorter_side: N} or {longer_side: N} (aspect ratio kept)")


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset in MVTec AD layout: ``<path>/<category>/{train,test,ground_truth}``."""

    name: str
    path: Path
    categories: tuple[str, ...]
    format: str = "mvtec"

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "name": DATASET_NAME, "path": PATH, "categories": list_of(SAFE_NAME), "format": one_of(*DATASET_FORMATS)}


@dataclass(frozen=True)
class ClassificationDatasetConfig:
    """A one-vs-rest dataset for Protocol A: every class in turn is normal."""

    name: str
    format: str
    path: Path | None = None
    classes: tuple[str, ...] | str = "all"

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "name": DATASET_NAME, "format": one_of(*CLASSIFICATION_FORMATS), "path": optional(PATH),
        "classes": either(one_of("all"), list_of(TEXT))}


@dataclass(frozen=True)
class ProtocolAConfig:
    """Protocol A: penultimate pooled features, one class normal, the rest anomalous (paper: 20 epochs, batch 64)."""

    datasets: dict[str, ClassificationDatasetConfig] = field(default_factory=dict)
    resize: int = 224
    crop: int = 224
    epochs: int = 20
    batch_size: int = 64

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "datasets": MAPPING, "resize": POSITIVE, "crop": POSITIVE, "epochs": POSITIVE, "batch_size": POSITIVE}


@dataclass(frozen=True)
class ProtocolCConfig:
    """Protocol C (online, cold start): batch 1, one pass over the normal training stream in a seeded order."""

    datasets: tuple[str, ...] = ()
    seed: int = 1024
    # Every learning-curve checkpoint scores about this many test images (a seeded sample stratified by defect
    # type; 0: the whole split); the final metrics, the reported result, score the whole split.
    curve_test_images: int = 100

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {"datasets": list_of(DATASET_NAME, min_len=0), "seed": SEED,
                                              "curve_test_images": integer(0)}


@dataclass(frozen=True)
class PeersConfig:
    """Peer detectors scored on the same cached features as the projector."""

    methods: tuple[str, ...] = PEER_METHODS
    coreset_ratio: float = 0.01  # PatchCore: fraction of patch features kept by the greedy coreset
    k: int = 1  # PatchCore: nearest bank vectors averaged per patch
    projection_dim: int = 128  # PatchCore: random projection used while selecting the coreset
    # PatchCore: at most this many training vectors (a seeded sample) are held and thinned by the coreset;
    # None holds them all (PatchCore's paper). The greedy coreset costs coreset size x held vectors.
    bank_limit: int | None = 250_000
    padim_channels: int = 100  # PaDiM: random channel subset (0 keeps all)
    padim_covariance: str = "per_position"  # PaDiM: per_position | shared (memory-aware)
    padim_eps: float = 0.01

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "methods": list_of(one_of(*PEER_METHODS), min_len=0), "coreset_ratio": real(0, 1, low_open=True),
        "k": POSITIVE, "projection_dim": POSITIVE, "bank_limit": optional(POSITIVE), "padim_channels": integer(0),
        "padim_covariance": one_of("per_position", "shared"), "padim_eps": real(0, low_open=True)}


@dataclass(frozen=True)
class AnalysisConfig:
    """The analysis reports (feasibility, training budget, figures)."""

    tolerance: float = 0.01  # a norm is feasible while its AUROC is within this of the best swept norm
    budget_epochs: tuple[int, ...] = (1, 2, 5, 10, 20, 30, 40, 50)  # AUROC-vs-epoch evaluation points
    # Every budget epoch scores about this many test images (seeded, stratified by defect type; 0: all).
    budget_test_images: int = 100
    tsne_points: int = 600  # per center distribution
    overlays_per_category: int = 3

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "tolerance": real(0, 1, high_open=True), "budget_epochs": list_of(POSITIVE, increasing=True),
        "budget_test_images": integer(0), "tsne_points": integer(4), "overlays_per_category": POSITIVE}


@dataclass(frozen=True)
class DeployConfig:
    """Saved models for ``polarocc predict``/``stream``: the default decision threshold."""

    threshold_quantile: float = 0.99
    # Fraction of the normal training images held out (seeded by train.seed) to set the threshold on scores of
    # images the model was not trained on; 0: the training images' own (lower) scores.
    holdout: float = 0.2

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {"threshold_quantile": real(0, 1, low_open=True),
                                              "holdout": real(0, 1, high_open=True)}


@dataclass(frozen=True)
class EmbeddedDataConfig:
    """The embedded real-texture dataset generated by the ``prepare`` stage."""

    output: Path = Path("data/textures")
    categories: tuple[str, ...] = EMBEDDED_CATEGORIES
    defect_types: tuple[str, ...] = DEFECT_TYPES
    train: int = 64
    test_good: int = 16
    defects_per_type: int = 6
    crop: int = 200
    image_size: int = 256
    seed: int = 1024
    # textures: square crops; small_defects: crop x 2.5*crop regions, longer side image_size, with the defect
    # types tiny, small, border and medium (all four where defect_types is left at the standard default).
    variant: str = "textures"

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "output": PATH, "categories": list_of(one_of(*EMBEDDED_CATEGORIES)),
        "defect_types": list_of(one_of(*DEFECT_TYPES, *SMALL_DEFECT_TYPES)), "train": POSITIVE,
        "test_good": POSITIVE, "defects_per_type": POSITIVE, "crop": integer(8), "image_size": integer(8),
        "seed": SEED, "variant": one_of(*VARIANT_DEFECT_TYPES)}

    def with_variant_types(self) -> EmbeddedDataConfig:
        """This config with the defect types its variant makes: the variant's own where ``defect_types`` is
        the standard default; ConfigError naming ``embedded_data.defect_types`` for a type the variant lacks
        (or ``embedded_data.image_size`` for small_defects images too small to hold its defects)."""
        _require(self.variant != "small_defects" or self.image_size >= SMALL_DEFECTS_MIN_SIZE,
                 "embedded_data.image_size", f"the small_defects variant needs at least {SMALL_DEFECTS_MIN_SIZE} "
                 f"(its images are image_size / 2.5 rows), got {self.image_size}")
        valid = VARIANT_DEFECT_TYPES[self.variant]
        if self.defect_types == DEFECT_TYPES:
            return replace(self, defect_types=valid)
        wrong = [kind for kind in self.defect_types if kind not in valid]
        if wrong:
            # The rule of the key accepts every variant's types, so a wrong one belongs to another variant.
            owner = next(v for v, kinds in VARIANT_DEFECT_TYPES.items() if set(wrong) <= set(kinds))
            hint = (f"or set embedded_data.variant: {owner}" if self.variant == "textures"
                    else f"or leave the default [{', '.join(DEFECT_TYPES)}] for all of them")
            raise ConfigError(f"params key 'embedded_data.defect_types': {', '.join(wrong)} not made by variant "
                              f"{self.variant}; choose from {', '.join(valid)} ({hint})")
        return self


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen timm feature extractor and its multi-scale aggregation."""

    name: str = "tf_efficientnet_lite0"
    weights: str = "package"
    layers: tuple[int, ...] = (1, 2, 3)
    pool: int = 3
    # The paper's square 256 then center crop 224; also [h, w], {shorter_side: N} or {longer_side: N} (aspect kept)
    resize: int | tuple[int, int] | dict[str, int] = 256
    crop: int | tuple[int, int] | None = 224  # None: the whole resized frame
    tiles: dict[str, Any] | None = None  # {size: px, overlap: fraction}: features from overlapping tiles
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "name": TEXT, "weights": TEXT, "layers": list_of(integer(0), increasing=True),
        "pool": Rule(lambda v: _is_int(v) and v >= 1 and v % 2 == 1, "an odd positive kernel size (1 = no pooling)"),
        "resize": either(POSITIVE, list_of(POSITIVE, 2, 2, unique=False), SIDE_RESIZE),
        "crop": optional(either(POSITIVE, list_of(POSITIVE, 2, 2, unique=False))),
        "tiles": Rule(lambda v: v is None or isinstance(v, dict), "null or a mapping {size: 224, overlap: 0.25}"),
        "mean": optional(list_of(real(), 3, 3, unique=False)),
        "std": optional(list_of(real(0, low_open=True), 3, 3, unique=False))}

    def geometry(self) -> GeometrySpec:
        """The input geometry these params describe (checked: crop inside the resize, tiles inside the input)."""
        return GeometrySpec.parse(self.resize, self.crop, self.tiles)


@dataclass(frozen=True)
class ExtractConfig:
    """How cached features are computed and stored."""

    dtype: str = "float16"
    batch_size: int = 16
    shard_images: int = 16
    compressor: str = "lz4"
    level: int = 5
    device: str = "auto"
    scheduler: str = "inprocess"  # inprocess | local (dask LocalCluster) | a dask scheduler address
    workers: int = 2  # LocalCluster worker processes
    threads_per_worker: int = 1  # torch threads in each worker

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "dtype": one_of(*FEATURE_DTYPES), "batch_size": POSITIVE, "shard_images": POSITIVE,
        "compressor": one_of(*COMPRESSORS), "level": integer(0, 22), "device": one_of(*DEVICES),
        "scheduler": SCHEDULER, "workers": POSITIVE, "threads_per_worker": POSITIVE}


@dataclass(frozen=True)
class CenterConfig:
    """The default center variant (the one reported as the headline result)."""

    distribution: str = "normal"
    norm: float = 1.0
    seed: int = 1024

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {"distribution": one_of(*DISTRIBUTIONS), "norm": NORM, "seed": SEED}


@dataclass(frozen=True)
class ProjectorConfig:
    """The trainable projector: an affine 1x1 map from C to C channels."""

    kind: str = "conv1x1"
    bias: bool = True

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {"kind": one_of(*PROJECTORS), "bias": BOOLEAN}


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation of the projector (paper defaults for Protocol B)."""

    trainer: str = "gram"
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-4
    weight_decay: float = 5e-4
    radius: float = 1e-5
    seed: int = 1024
    dtype: str = "float64"
    stats_memory_mb: int = 4096  # in memory up to this: stored Gram matrices (on a GPU also streamed features)
    statistics: str = "auto"  # stored (per-image Gram at extraction) | streamed (per batch, every epoch) | auto
    device: str = "auto"  # where the statistics and the steps are computed

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "trainer": one_of(*TRAINERS), "statistics": one_of(*STATISTICS), "epochs": POSITIVE,
        "batch_size": POSITIVE, "lr": real(0, low_open=True),
        "weight_decay": real(0), "radius": real(0, low_open=True), "seed": SEED,
        "dtype": one_of("float32", "float64"), "stats_memory_mb": POSITIVE, "device": one_of(*DEVICES)}


@dataclass(frozen=True)
class ScoreConfig:
    """How anomaly maps become image scores."""

    sigma: float = 4.0
    reduction: str = "max"
    topk: int = 10
    squared: bool = True
    device: str = "auto"
    metrics_memory_mb: int = 2048  # pixel metrics are exact while every map fits this, else binned (bounded)

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "sigma": real(0), "reduction": one_of(*REDUCTIONS), "topk": POSITIVE, "squared": BOOLEAN,
        "device": one_of(*DEVICES), "metrics_memory_mb": integer(0)}


@dataclass(frozen=True)
class SweepConfig:
    """The axes of the ``train``/``score`` matrix stages."""

    norms: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64)
    distributions: tuple[str, ...] = DISTRIBUTIONS

    CONSTRAINTS: ClassVar[dict[str, Rule]] = {
        "norms": list_of(NORM), "distributions": list_of(one_of(*DISTRIBUTIONS))}


# params.yaml's sections and the class each is read into (``datasets`` and ``protocol_a.datasets`` hold one
# DatasetConfig / ClassificationDatasetConfig per entry).
SECTIONS: dict[str, type] = {
    "embedded_data": EmbeddedDataConfig, "backbone": BackboneConfig, "extract": ExtractConfig,
    "center": CenterConfig, "projector": ProjectorConfig, "train": TrainConfig, "score": ScoreConfig,
    "sweep": SweepConfig, "protocol_a": ProtocolAConfig, "protocol_c": ProtocolCConfig, "deploy": DeployConfig,
    "peers": PeersConfig, "analysis": AnalysisConfig,
}
CONFIG_CLASSES: tuple[type, ...] = (DatasetConfig, ClassificationDatasetConfig, *SECTIONS.values())
RENAMED_SECTIONS = {"textures": "embedded_data"}


@dataclass(frozen=True)
class Params:
    """All of params.yaml."""

    datasets: dict[str, DatasetConfig]
    embedded_data: EmbeddedDataConfig = field(default_factory=EmbeddedDataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    center: CenterConfig = field(default_factory=CenterConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    protocol_a: ProtocolAConfig = field(default_factory=ProtocolAConfig)
    protocol_c: ProtocolCConfig = field(default_factory=ProtocolCConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    peers: PeersConfig = field(default_factory=PeersConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    root: Path = Path(".")

    def variants(self) -> list[tuple[str, float]]:
        """Every (distribution, norm) pair of the sweep, in the matrix order."""
        return [(d, n) for d in self.sweep.distributions for n in self.sweep.norms]


def _mapping(value: Any, key: str) -> dict[str, Any]:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ConfigError(f"params key '{key}' must be a mapping, got {type(value).__name__}")
    return value


def build_section(cls: type, raw: dict[str, Any], section: str, label: str = "params key") -> Any:
    """``cls`` from a params mapping: unknown keys refused, every field checked against ``cls.CONSTRAINTS``;
    errors name ``section.key`` (or ``key`` alone for an empty ``section``) as a ``label``."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)

    def qualified(name: str) -> str:
        return f"{section}.{name}" if section else name

    if unknown:
        raise ConfigError(f"unknown {label}(s) {', '.join(qualified(k) for k in unknown)}; "
                          f"valid keys are {', '.join(sorted(known))}")
    missing = sorted(f.name for f in fields(cls)
                     if f.name not in raw and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise ConfigError(f"{label} '{qualified(missing[0])}' is missing; set it (see README, Parameters)")
    values = {}
    for key, value in raw.items():
        if isinstance(value, list):
            value = tuple(value)
        if key in ("path", "output") and isinstance(value, str) and value:
            value = Path(value)
        values[key] = value
    config = cls(**values)
    for f in fields(cls):
        message = violation(cls.CONSTRAINTS[f.name], getattr(config, f.name), qualified(f.name), label)
        if message:
            raise ConfigError(message)
    return config


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"params key '{key}': {message}")


def validate_norm(norm: Any, key: str = "center.norm") -> float:
    """Return ``norm`` as a float, or raise naming ``key`` if it is not a positive finite number."""
    _require(NORM.test(norm), key, f"a center norm must be a positive finite number, got {norm!r}")
    return float(norm)


def parse_params(raw: Any, root: Path | str = ".", source: str = "params.yaml") -> Params:
    """Build and validate :class:`Params` from the parsed YAML mapping (read from ``source``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections (datasets, backbone, train, ...)")
    for old, new in RENAMED_SECTIONS.items():
        _require(old not in raw, old, f"this section is now called '{new}': rename it in params.yaml")
    unknown = sorted(set(raw) - {"datasets", *SECTIONS})
    if unknown:
        raise ConfigError(f"unknown params section(s) {', '.join(unknown)}; valid sections are "
                          f"{', '.join(['datasets', *SECTIONS])}")
    datasets_raw = _mapping(raw.get("datasets"), "datasets")
    datasets = {}
    for name, entry in datasets_raw.items():
        key = f"datasets.{name}"
        _require(isinstance(entry, dict), key, "must be a mapping with path and categories")
        fmt = entry.get("format", "mvtec")
        _require(fmt in DATASET_FORMATS or fmt not in CLASSIFICATION_FORMATS, f"{key}.format",
                 f"{fmt} has class labels but no pixel masks, and 'datasets' is for Protocol B (detection and "
                 "segmentation): declare it under protocol_a.datasets instead")
        datasets[name] = build_section(DatasetConfig, {"name": name, **entry}, key)

    raw_a = dict(_mapping(raw.get("protocol_a"), "protocol_a"))
    a_datasets = {}
    for name, entry in _mapping(raw_a.pop("datasets", None), "protocol_a.datasets").items():
        key = f"protocol_a.datasets.{name}"
        _require(isinstance(entry, dict), key, "must be a mapping with format (and path)")
        _require(name not in datasets, key, "has the name of a Protocol B dataset; each dataset needs its own name")
        a_datasets[name] = build_section(ClassificationDatasetConfig, {"name": name, **entry}, key)
    sections = {name: build_section(cls, {**_mapping(raw.get(name), name), **({"datasets": a_datasets}
                                                                        if name == "protocol_a" else {})}, name)
                for name, cls in SECTIONS.items()}
    sections["embedded_data"] = sections["embedded_data"].with_variant_types()
    params = Params(datasets=datasets, root=Path(root), **sections)
    _check_consistency(params)
    return params


def _check_consistency(p: Params) -> None:
    """The rules that tie several keys together (each key alone was checked by its constraint)."""
    _require(bool(p.datasets) or bool(p.protocol_a.datasets), "datasets",
             "declare at least one dataset (here, or under protocol_a.datasets)")
    b = p.backbone
    b.geometry()
    e = p.extract
    if e.compressor in ("lz4", "blosc"):
        _require(e.level <= 9, "extract.level", f"blosc ({e.compressor}) levels are 0..9, got {e.level}")
    a = p.protocol_a
    _require(a.crop <= a.resize, "protocol_a.crop", f"({a.crop}) must not exceed protocol_a.resize ({a.resize})")
    for ds in a.datasets.values():
        _require(ds.format == "digits" or ds.path is not None, f"protocol_a.datasets.{ds.name}.path",
                 f"is missing: set the folder holding the {ds.format} files")
    c = p.protocol_c
    for name in c.datasets:
        _require(name in p.datasets, "protocol_c.datasets",
                 f"{name!r} is not declared under 'datasets'; choose from {', '.join(p.datasets)}")
    _require(not c.datasets or p.center.distribution != "feature_mean", "center.distribution",
             "Protocol C starts cold, before any data is seen, so its center cannot be 'feature_mean'; use "
             "normal, uniform or ones (or empty protocol_c.datasets)")
    labels = [norm_label(n) for n in p.sweep.norms]
    _require(len(set(labels)) == len(labels), "sweep.norms", f"lists the same norm twice ({', '.join(labels)})")
    _require(p.center.distribution in p.sweep.distributions, "center.distribution",
             f"the default variant's distribution {p.center.distribution!r} must be in sweep.distributions")
    _require(float(p.center.norm) in [float(n) for n in p.sweep.norms], "center.norm",
             f"the default variant's norm {p.center.norm:g} must be in sweep.norms")


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate params.yaml; paths inside it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no params file at {path}: run from the project root or pass --params")
    try:
        raw = read_yaml(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path} is not valid YAML: {problem}{where}; fix the syntax there") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    return parse_params(raw, root=path.parent, source=str(path))


def read_yaml(text: str) -> Any:
    """Parse YAML 1.2, as DVC does: the values polarocc validates are the ones ``dvc exp run -S`` writes and
    dvc.lock records (YAML 1.1 would read ``5e-05`` as a string and ``010`` as 8)."""
    return YAML(typ="safe", pure=True).load(text)


def resolve(params: Params, path: Path) -> Path:
    """A params path made absolute against the params file's folder."""
    return path if path.is_absolute() else params.root / path


def check_datasets_exist(params: Params) -> None:
    """Fail early when a user-supplied dataset folder or category is missing.

    Datasets written by the ``prepare`` stage (the embedded data) are exempt: they appear later.
    """
    generated = resolve(params, params.embedded_data.output).resolve()
    for ds in params.datasets.values():
        root = resolve(params, ds.path)
        if root.resolve() == generated:
            continue
        if not root.is_dir():
            raise ConfigError(
                f"params key 'datasets.{ds.name}.path': folder {root} does not exist. Download the dataset "
                f"(MVTec AD: mvtec.com/company/research/datasets/mvtec-ad; MPDD: github.com/stepanje/MPDD) "
                f"and set datasets.{ds.name}.path to its root"
            )
        for cat in ds.categories:
            if not (root / cat).is_dir():
                present = sorted(p.name for p in root.iterdir() if p.is_dir())
                raise ConfigError(
                    f"params key 'datasets.{ds.name}.categories': category '{cat}' is not a folder of {root}; "
                    f"found {', '.join(present) or 'nothing'}"
                )


def check_protocol_a_paths(params: Params) -> None:
    """Fail early when a Protocol A dataset folder is missing."""
    for ds in params.protocol_a.datasets.values():
        if ds.path is not None and not resolve(params, ds.path).exists():
            raise ConfigError(
                f"params key 'protocol_a.datasets.{ds.name}.path': {resolve(params, ds.path)} does not exist; "
                f"put the {ds.format} files there (see README, 'Dataset formats') or fix the path"
            )


def norm_label(norm: float) -> str:
    """The spelling of a norm used in stage names and paths (``1``, ``0.5``)."""
    return f"{norm:g}"
