"""Where each stage reads and writes, relative to the project root (mirrors dvc.yaml)."""

from __future__ import annotations

import re
from pathlib import Path

from ruamel.yaml import YAMLError

from polarocc.config import Params, norm_label, read_yaml, resolve
from polarocc.errors import UnsafePathError
from polarocc.ownership import inside

FEATURES = Path("data/features")
PARTIAL = Path("data/.partial")
MODELS = Path("models")
REPORTS = Path("reports")


def feature_store(params: Params, dataset: str, category: str) -> Path:
    """The complete store of one category."""
    return params.root / FEATURES / dataset / f"{category}.zarr"


def partial_store(params: Params, dataset: str, category: str) -> Path:
    """Where the store is built before it is moved into place (outside DVC's outputs, so it survives)."""
    return params.root / PARTIAL / dataset / f"{category}.zarr"


def dataset_root(params: Params, dataset: str) -> Path:
    """The dataset's root folder."""
    return resolve(params, params.datasets[dataset].path)


def norm_dir(norm: float) -> str:
    """Folder and file stem of one norm's stages (``norm-1``), as in dvc.yaml."""
    return f"norm-{norm_label(norm)}"


def model_dir(params: Params, norm: float) -> Path:
    """Trained projectors of every distribution at one norm (the output of ``train@<norm>``)."""
    return params.root / MODELS / norm_dir(norm)


def file_stem(name: str) -> str:
    """A file-name-safe spelling of a category or class name ('T-shirt/top' -> 'T-shirt_top')."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def model_file(params: Params, norm: float, distribution: str, dataset: str, category: str) -> Path:
    """One trained projector."""
    return model_dir(params, norm) / distribution / dataset / f"{file_stem(category)}.pt"


def norm_scores(params: Params, norm: float) -> Path:
    """Metrics and image scores of every distribution at one norm (the output of ``score@<norm>``)."""
    return params.root / REPORTS / "variants" / f"{norm_dir(norm)}.json"


def extraction_record(params: Params, dataset: str) -> Path:
    """What extracting a dataset cost per category: input geometry, seconds and bytes per image."""
    return params.root / REPORTS / "extract" / f"{dataset}.json"


def reports(params: Params) -> Path:
    """The reports folder."""
    return params.root / REPORTS


def deploy_dir(params: Params) -> Path:
    """The ``export`` stage's output folder: one model file per Protocol B category."""
    return params.root / MODELS / "deploy"


def deploy_model(params: Params, dataset: str, category: str) -> Path:
    """The saved model of the default center variant (the output of ``export``), for ``polarocc predict``."""
    return deploy_dir(params) / dataset / f"{file_stem(category)}.pt"


def online_model(params: Params, dataset: str, category: str) -> Path:
    """The saved model at the end of Protocol C's stream (the output of ``online@<dataset>``)."""
    return params.root / MODELS / "online" / dataset / f"{file_stem(category)}.pt"


def online_report(params: Params, dataset: str) -> Path:
    """Protocol C metrics and learning curve of one dataset (JSON)."""
    return params.root / REPORTS / "online" / f"{dataset}.json"


def learning_curve_csv(params: Params, dataset: str) -> Path:
    """The learning curve of one dataset, a row per category and checkpoint (plus the category mean)."""
    return params.root / REPORTS / "online" / f"{dataset}_curve.csv"


def mean_learning_curve_csv(params: Params, dataset: str) -> Path:
    """The category-mean learning curve of one dataset (the ``dvc plots`` source)."""
    return params.root / REPORTS / "learning_curves" / f"{dataset}.csv"


def learning_curve_plot(params: Params, dataset: str) -> Path:
    """The learning-curve figure of one dataset."""
    return params.root / REPORTS / "plots" / f"learning_curve_{dataset}.png"


def peers_report(params: Params) -> Path:
    """Metrics of the peer detectors (the output of ``peers``)."""
    return params.root / REPORTS / "peers.json"


def analysis_dir(params: Params) -> Path:
    """JSON outputs of the ``analyze`` stage."""
    return params.root / REPORTS / "analysis"


def tsne_plot(params: Params, dataset: str) -> Path:
    """t-SNE of projected features per center distribution."""
    return params.root / REPORTS / "plots" / "analysis" / f"tsne_{dataset}.png"


def overlay_plot(params: Params, dataset: str, category: str) -> Path:
    """Anomaly-map overlays of a fixed selection of test images of one category."""
    return params.root / REPORTS / "plots" / "analysis" / f"overlays_{dataset}_{file_stem(category)}.png"


EMBEDDED_KEY = "embedded_data.output"


def embedded_output(params: Params) -> Path:
    """The folder the ``prepare`` stage writes (``embedded_data.output``), resolved and checked to lie inside the
    project. Whether it may be replaced is :func:`polarocc.ownership.check_replaceable`'s question, with
    ``recorded_outputs(root, "prepare")`` as the folders dvc.lock says the stage wrote."""
    out = inside(params.root, resolve(params, params.embedded_data.output), EMBEDDED_KEY)
    if out == params.root.resolve():
        raise UnsafePathError(f"{EMBEDDED_KEY}: the project folder itself cannot be the generated dataset; use "
                              "data/textures")
    return out


def recorded_outputs(root: Path, stage: str) -> frozenset[Path]:
    """Outputs dvc.lock records for one stage of this project (resolved): what DVC made from that stage."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return frozenset()
    try:
        stages = (read_yaml(lock.read_text()) or {}).get("stages", {})
    except (YAMLError, UnicodeDecodeError, AttributeError):
        return frozenset()
    entry = stages.get(stage) if isinstance(stages, dict) else None
    if not isinstance(entry, dict):
        return frozenset()
    return frozenset((Path(root) / out["path"]).resolve() for out in entry.get("outs", [])
                     if isinstance(out, dict) and isinstance(out.get("path"), str))


def backbone_check(params: Params) -> Path:
    """The output of the ``validate_backbone`` stage, on which ``validate`` depends."""
    return params.root / REPORTS / "backbone_check.json"


def params_check(params: Params) -> Path:
    """The output of the ``validate`` stage, on which every other stage depends."""
    return params.root / REPORTS / "params_check.json"
