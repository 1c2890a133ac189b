"""The ``polarocc`` command line (typer)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from polarocc.config import BackboneConfig, DeployConfig, TrainConfig
from polarocc.errors import ConfigError, MissingOutputError, PolaroccError

app = typer.Typer(help="Data-agnostic one-class anomaly detection with a random hypersphere center.",
                  no_args_is_help=True, add_completion=False)

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml of the pipeline")


F = TypeVar("F", bound=Callable[..., Any])


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from exc


def _user_errors(command: F) -> F:
    """Run a command; an error the user can cause (a PolaroccError) prints its one line and exits 2."""
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except PolaroccError as exc:
            _fail(exc)

    return run  # type: ignore[return-value]


@app.command()
@_user_errors
def validate(params: Path = PARAMS) -> None:
    """Check params.yaml, the backbone name and every dataset path without computing anything."""
    from polarocc.config import load_params
    from polarocc.pipeline.validate import describe_image_level, image_level_categories, validate_environment

    p = load_params(params)
    validate_environment(p)
    for line in describe_image_level(image_level_categories(p)):
        typer.echo(line)
    variants = len(p.variants())
    categories = sum(len(d.categories) for d in p.datasets.values())
    typer.echo(f"ok: {len(p.datasets)} dataset(s), {categories} categories, {variants} center variants "
               f"({len(p.sweep.distributions)} distributions x {len(p.sweep.norms)} norms)")


@app.command()
@_user_errors
def plan(params: Path = PARAMS,
         as_json: bool = typer.Option(False, "--json", help="print the plan as JSON")) -> None:
    """Before running: images per split, bytes of features, statistics, models and DVC cache, free disk, peak
    memory and expected time per stage (estimates); exits 1 when the run does not fit this machine."""
    import json

    from polarocc.config import load_params
    from polarocc.planning import format_plan, make_plan
    from polarocc.timing import with_stage_times

    loaded = load_params(params)
    result = with_stage_times(loaded, make_plan(loaded))
    typer.echo(json.dumps(result.to_dict(), indent=1) if as_json else format_plan(result))
    if not result.fits:
        raise typer.Exit(1)


@app.command()
@_user_errors
def results(params: Path = PARAMS, dataset: str | None = typer.Option(None, help="only this dataset"),
            per_category: bool = typer.Option(False, "--per-category", help="one row per category")) -> None:
    """Print the results of the last `dvc repro` (reports/results.csv) as a table."""
    import polars as pl

    from polarocc import layout
    from polarocc.config import load_params
    from polarocc.reports.tables import read_results, sweep_means

    p = load_params(params)
    csv = layout.reports(p) / "results.csv"
    if not csv.is_file():
        raise MissingOutputError(f"{csv} does not exist yet: run `dvc repro` first")
    table = read_results(csv)
    if dataset:
        table = table.filter(pl.col("dataset") == dataset)
    shown = table.select(["method", "protocol", "dataset", "category", "distribution", "norm", "image_auroc",
                          "pixel_auroc", "aupro"]) if per_category else sweep_means(table).drop(
        "image_f1_max", "pixel_f1_max")
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4, tbl_width_chars=160, tbl_hide_column_data_types=True):
        typer.echo(shown)


@app.command("convert-visa")
@_user_errors
def convert_visa_command(
    root: Annotated[Path, typer.Argument(help="the original VisA folder (holding split_csv/1cls.csv)")],
    out: Annotated[Path, typer.Argument(help="where to write the MVTec-layout copy")],
    category: Annotated[list[str] | None, typer.Option("--category", "-c", help="only these objects")] = None,
) -> None:
    """Convert VisA to MVTec AD layout (masks binarised); then set datasets.<name>.path to OUT."""
    from polarocc.data.visa import convert_visa

    counts = convert_visa(root, out, category or None)
    for obj, folders in counts.items():
        typer.echo(f"{obj}: " + ", ".join(f"{folder} {n}" for folder, n in folders.items()))


class ExportFormat(StrEnum):
    """What `polarocc export` writes."""

    torch = "torch"
    onnx = "onnx"


@app.command()
@_user_errors
def export(
    category: Annotated[str | None, typer.Argument(
        help="category (Protocol B) to export; leave it out with --model", metavar="CATEGORY",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Argument(
        help="file to write: a model file (.pt) or, with --format onnx, an ONNX graph (.onnx)",
        metavar="OUT", show_default=False)] = None,
    dataset: Annotated[str | None, typer.Option(help="dataset; default: the only one declared")] = None,
    norm: Annotated[float | None, typer.Option(help="center norm; default center.norm")] = None,
    distribution: Annotated[str | None, typer.Option(help="center distribution; default center.distribution")] = None,
    model: Annotated[Path | None, typer.Option(
        "--model", help="convert this model file (predict, stream --save-model) instead of a pipeline variant: "
        "polarocc export --model FILE OUT")] = None,
    fmt: Annotated[ExportFormat, typer.Option(
        "--format", help="torch: a model file for predict/stream; onnx: one graph from uint8 images to scores and "
        "anomaly maps, for onnxruntime")] = ExportFormat.torch,
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset (--format onnx)")] = 17,
    params: Path = PARAMS,
) -> None:
    """Save one trained variant (after `dvc repro`), or convert a model file (--model), for predict/stream or
    as ONNX (--format onnx)."""
    from polarocc.detector.artefact import load_artefact, save_artefact

    if model is not None:
        # The one positional argument given is the output: `polarocc export --model FILE OUT`.
        if out is not None or category is None:
            raise ConfigError("with --model give only the output file: polarocc export --model FILE OUT")
        if dataset is not None or norm is not None or distribution is not None:
            raise ConfigError("--dataset, --norm and --distribution choose a pipeline variant; leave them out "
                              "with --model")
        out = Path(category)
    elif category is None or out is None:
        raise ConfigError("give CATEGORY and OUT (polarocc export CATEGORY OUT), or --model FILE OUT")
    if fmt is ExportFormat.onnx:
        from polarocc.deploy.onnx_export import check_onnx_target, export_artefact_onnx

        check_onnx_target(out)  # before any work (also fails here when onnx is not installed)
    if model is not None:
        artefact = load_artefact(model)
        path = (export_artefact_onnx(artefact, out, opset) if fmt is ExportFormat.onnx
                else save_artefact(out, artefact))
        typer.echo(f"wrote {path}")
        return

    from polarocc.config import load_params
    from polarocc.pipeline.export import export_variant, variant_artefact

    p = load_params(params)
    if dataset is None:
        if len(p.datasets) != 1:
            raise ConfigError(f"several datasets are declared ({', '.join(p.datasets)}); pass --dataset")
        dataset = next(iter(p.datasets))
    chosen = (p.center.norm if norm is None else norm, distribution or p.center.distribution, dataset, category)
    if fmt is ExportFormat.torch:
        path = export_variant(p, *chosen, out)
    else:
        path = export_artefact_onnx(variant_artefact(p, *chosen), out, opset)
    typer.echo(f"wrote {path}")


@app.command()
@_user_errors
def fit(
    good: Annotated[Path, typer.Argument(help="folder of normal (good) images; read recursively")],
    out: Annotated[Path, typer.Option("--out", "-o", help="model file to write (.pt)")],
    test: Annotated[Path | None, typer.Option(
        help="labelled test folder in MVTec layout (good/ and one folder per defect type): print its metrics")] = None,
    masks: Annotated[Path | None, typer.Option(
        help="the defects' masks in MVTec layout (<defect_type>/<name>_mask.png): pixel ROC AUC and AUPRO too")
    ] = None,
    backbone: Annotated[str, typer.Option(help="timm model name")] = BackboneConfig.name,
    weights: Annotated[str, typer.Option(
        help="package (offline Lite0) | hub | path to a weights file")] = BackboneConfig.weights,
    resize: Annotated[str, typer.Option(
        help="resize: N (square), HxW, or longer:N / shorter:N (aspect ratio kept)")] = str(BackboneConfig.resize),
    crop: Annotated[str, typer.Option(help="center crop after the resize: N, HxW, or none (the whole frame)")] = str(
        BackboneConfig.crop),
    tiles: Annotated[str, typer.Option(
        help="backbone on overlapping tiles of the model input: SIZE[:OVERLAP] (e.g. 224:0.25), or none")] = "none",
    epochs: Annotated[int, typer.Option(help="training epochs (the paper: 50)")] = TrainConfig.epochs,
    holdout: Annotated[float, typer.Option(
        help="fraction of the good images held out to set the threshold (0: the training images' scores)")
    ] = DeployConfig.holdout,
    quantile: Annotated[float, typer.Option(
        help="threshold = this quantile of the held-out images' scores")] = DeployConfig.threshold_quantile,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Train a detector on a folder of normal images (no DVC, no params.yaml) and save it for `polarocc predict`."""
    from polarocc.detector.artefact import check_model_target
    from polarocc.detector.detector import Detector
    from polarocc.geometry import parse_option

    geometry = {"resize": parse_option(resize, "--resize"), "crop": parse_option(crop, "--crop"),
                "tiles": parse_option(tiles, "--tiles")}
    samples = None
    if masks is not None and test is None:
        raise ConfigError("--masks needs --test (the images the masks belong to)")
    if test is not None:
        from polarocc.data.mvtec import check_files, missing_masks, read_test_folder

        samples = read_test_folder(test, masks)
        check_files(samples)  # a bad test image or a mask of another size stops it now, not after training
        missing = missing_masks(samples)
        if masks is not None and missing:
            typer.echo(f"warning: no mask in {masks} for " + ", ".join(f"{n} {kind}" for kind, n in
                       sorted(missing.items())) + " image(s) (expected <defect_type>/<name>_mask.png): "
                       "pixel metrics are left out", err=True)
    check_model_target(out)
    detector = Detector(backbone=backbone, weights=weights, **geometry, epochs=epochs, holdout=holdout,
                        quantile=quantile, device=device).fit(good)
    detector.save(out)
    threshold = detector.artefact.threshold
    typer.echo(f"wrote {out}; threshold {threshold.describe() if threshold else 'none'}")
    if samples is not None:
        from polarocc.deploy.evaluate import evaluate

        m = evaluate(detector, samples)
        line = f"test: {m['images']} images ({m['defective']} defective): image ROC AUC {m['image_auroc']:.4f}"
        if m["pixel_auroc"] is not None:
            line += f", pixel ROC AUC {m['pixel_auroc']:.4f}, AUPRO {m['aupro']:.4f}"
        typer.echo(line)
        typer.echo(f"at the threshold: {m['flagged_defective']} of {m['defective']} defective and "
                   f"{m['flagged_good']} of {m['images'] - m['defective']} good images flagged")


def _device(requested: str) -> str:
    from polarocc.device import pick_device

    return pick_device(requested, "--device")


@app.command()
@_user_errors
def predict(
    model: Annotated[Path, typer.Argument(help="saved model (models/deploy/..., models/online/... or export)")],
    inputs: Annotated[list[str] | None, typer.Argument(help="image files, folders or quoted glob patterns")] = None,
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="folder for scores.csv, maps/ and overlays/, replaced as a whole (new, empty, or an "
        "earlier polarocc predict output)")] = Path("predictions"),
    list_file: Annotated[Path | None, typer.Option("--list", help="a file listing one image path per line")] = None,
    threshold: Annotated[float | None, typer.Option(help="decision threshold on the score scale")] = None,
    quantile: Annotated[float | None, typer.Option(
        help="threshold = this quantile of the model's normal scores (training images', or a stream model's window)")
    ] = None,
    radius_threshold: Annotated[bool, typer.Option(
        "--radius-threshold", help="the paper's d > R rule (every image exceeds it in practice)")] = False,
    maps: Annotated[bool, typer.Option(help="write anomaly maps (.npy) and overlay PNGs")] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
) -> None:
    """Score images with a saved model: print and write scores and decisions, maps and overlays."""
    import polars as pl

    from polarocc.data.inputs import collect_images
    from polarocc.deploy.predict import choose_threshold
    from polarocc.deploy.predict import predict as run_predict
    from polarocc.detector.artefact import load_artefact
    from polarocc.detector.detector import Detector

    artefact = load_artefact(model)
    chosen = choose_threshold(artefact, threshold, quantile, radius_threshold)
    images = collect_images(inputs or [], list_file)
    detector = Detector.from_artefact(artefact, _device(device))
    table = run_predict(detector, images, out, chosen, batch_size, maps)
    typer.echo(f"threshold {chosen.describe()}")
    with pl.Config(tbl_rows=20, fmt_str_lengths=60, tbl_hide_dataframe_shape=True):
        typer.echo(table.select(["path", "score", "normalized_score", "anomalous"]))
    flagged = int(table["anomalous"].sum())
    typer.echo(f"{flagged} of {table.height} images anomalous; wrote {out / 'scores.csv'}"
               + (f", {out / 'maps'} and {out / 'overlays'}" if maps else ""))


@app.command()
@_user_errors
def stream(
    inputs: Annotated[list[str] | None, typer.Argument(help="image files, folders or quoted globs, in order")] = None,
    model: Annotated[Path | None, typer.Option(help="start from this saved model")] = None,
    cold_start: Annotated[bool, typer.Option(
        "--cold-start", help="start untrained from params.yaml (backbone, center, projector)")] = False,
    list_file: Annotated[Path | None, typer.Option("--list", help="a file listing one image path per line")] = None,
    csv_path: Annotated[Path, typer.Option("--csv", help="one row per image, appended as it goes")] = Path(
        "stream/stream.csv"),
    state: Annotated[Path, typer.Option(help="state file to resume from")] = Path("stream/state.pt"),
    clean: Annotated[bool, typer.Option("--clean", help="the stream holds only normal images: learn from all")] = False,
    threshold: Annotated[float | None, typer.Option(help="fixed decision threshold on the score scale")] = None,
    quantile: Annotated[float | None, typer.Option(
        help="adaptive threshold: this quantile of the scores of the last --window learned images")] = None,
    window: Annotated[int, typer.Option(min=1)] = 64,
    warmup: Annotated[int, typer.Option(min=0, help="take the first N images as normal")] = 0,
    save_every: Annotated[int, typer.Option(min=1, help="write the state file every N images")] = 1,
    save_model: Annotated[Path | None, typer.Option(help="write the final model here (for predict)")] = None,
    restart: Annotated[bool, typer.Option(
        "--restart", help="discard the state file and CSV (only ones polarocc stream wrote) and start over")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    params: Path = PARAMS,
) -> None:
    """Online use: score each image before learning from it; stop any time and rerun to resume."""
    from polarocc.data.inputs import collect_images
    from polarocc.deploy.stream import (
        OnlineLearner,
        StreamSettings,
        cold_start_artefact,
        cold_start_extractor,
        file_digest,
        run_stream,
        save_stream_model,
    )
    from polarocc.detector.artefact import check_model_target, load_artefact

    if (model is None) == (not cold_start):
        raise ConfigError("give either --model FILE or --cold-start")
    images = collect_images(inputs or [], list_file)
    extractor = None
    if cold_start:
        from polarocc.config import load_params

        p = load_params(params)
        extractor = cold_start_extractor(p)
        artefact = cold_start_artefact(p, extractor, images[0] if images else None)
        source = f"cold start from {params.resolve()}"
    else:
        artefact = load_artefact(model)
        source = f"{model.resolve()} sha256 {file_digest(model)[:16]}"
    t = artefact.train
    settings = StreamSettings(clean, threshold, quantile, window, warmup, float(t.get("lr", 1e-4)),
                              float(t.get("weight_decay", 5e-4)), float(t.get("radius", 1e-5)), save_every)
    settings.validate(artefact.threshold is not None)
    if save_model is not None:
        check_model_target(save_model)  # before the stream advances: a file that is not a model is refused now
    learner = OnlineLearner(artefact, settings, _device(device), extractor)
    counts = run_stream(learner, images, csv_path, state, source, restart)
    if save_model is not None:
        save_stream_model(learner, save_model)
    typer.echo(f"processed {counts['processed']} image(s) now, {counts['total']} in all; {counts['updates']} "
               f"updates; rows in {csv_path}, state in {state}"
               + (f", model in {save_model}" if save_model is not None else ""))


@app.command()
@_user_errors
def weights() -> None:
    """Convert (once) and locate the offline EfficientNet-Lite0 ImageNet weights used by default."""
    from polarocc.models.weights import converted_package_weights

    typer.echo(str(converted_package_weights()))


if __name__ == "__main__":
    app()
