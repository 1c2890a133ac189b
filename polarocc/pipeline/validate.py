"""Stage ``validate``: every param, the backbone, its weights, the dataset paths and the output folders are
checked before any stage computes or removes anything.

DVC runs this stage first whenever params.yaml changes, because every other stage depends on its output;
a bad param therefore stops ``dvc repro`` here, before DVC clears any earlier stage's outputs. Its output
holds no params, so a valid change reruns only the stages whose own params changed.
"""

from __future__ import annotations

from polarocc import layout
from polarocc.atomic import write_json
from polarocc.config import Params, check_datasets_exist, check_protocol_a_paths, resolve
from polarocc.data.textures import check_spec
from polarocc.device import check_device, check_scheduler
from polarocc.ownership import check_replaceable


def validate_backbone(params: Params) -> None:
    """The backbone name, its feature levels and its weights; raises a PolaroccError naming the key."""
    from polarocc.models.backbone import check_layers, check_weights  # here: timm's import costs seconds

    b = params.backbone
    check_layers(b.name, b.layers)
    check_weights(b.name, b.weights)


def validate_environment(params: Params, backbone: bool = True) -> None:
    """Everything about params that can be checked without computing: raises a PolaroccError naming the key.
    ``backbone=False`` leaves out :func:`validate_backbone` (the pipeline runs it as its own stage)."""
    if backbone:
        validate_backbone(params)
    e = params.embedded_data
    check_spec(e.categories, e.crop, e.variant)
    check_device(params.extract.device, "extract.device")
    check_device(params.score.device, "score.device")
    check_device(params.train.device, "train.device")
    check_scheduler(params.extract.scheduler)
    check_replaceable(layout.embedded_output(params), layout.EMBEDDED_KEY, "prepare",
                      layout.recorded_outputs(params.root, "prepare"))
    check_datasets_exist(params)
    check_protocol_a_paths(params)


def image_level_categories(params: Params) -> dict[str, dict[str, dict[str, int]]]:
    """Per Protocol B dataset, its categories whose defective test images lack masks (defect type -> images):
    those report image-level metrics only. The embedded data, not written yet before ``prepare``, is skipped."""
    from polarocc.data.mvtec import missing_masks, read_split

    generated = resolve(params, params.embedded_data.output).resolve()
    found: dict[str, dict[str, dict[str, int]]] = {}
    for name, ds in params.datasets.items():
        root = resolve(params, ds.path)
        if root.resolve() == generated and not root.is_dir():
            continue
        for category in ds.categories:
            missing = missing_masks(read_split(root, category, "test"))
            if missing:
                found.setdefault(name, {})[category] = missing
    return found


def describe_image_level(found: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """One line per image-level category, for the terminal."""
    return [f"{dataset}/{category}: image-level only (no masks for "
            + ", ".join(f"{n} {kind}" for kind, n in sorted(missing.items())) + " image(s)): pixel metrics left out"
            for dataset, categories in found.items() for category, missing in categories.items()]


def run_validate_backbone(params: Params) -> dict:
    """Validate the backbone and write ``reports/backbone_check.json`` (constant content).

    Its own stage, with only the ``backbone`` params, so that DVC skips it (and timm's import) when other
    params change, as in a norm sweep; ``validate`` depends on its output and so runs after it."""
    validate_backbone(params)
    result = {"backbone": "valid"}
    write_json(layout.backbone_check(params), result, newline=True)
    return result


def run_validate(params: Params) -> dict:
    """Validate everything but the backbone (see :func:`run_validate_backbone`) and write
    ``reports/params_check.json`` (constant content: it only orders the stages)."""
    validate_environment(params, backbone=False)
    result = {"params": "valid"}
    write_json(layout.params_check(params), result, newline=True)
    return result
