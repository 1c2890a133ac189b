"""The ``polarocc`` command line (typer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polarocc.errors import PolaroccError

app = typer.Typer(help="Data-agnostic one-class anomaly detection with a random hypersphere center.",
                  no_args_is_help=True, add_completion=False)

PARAMS = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml of the pipeline")


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2) from exc


@app.command()
def validate(params: Path = PARAMS) -> None:
    """Check params.yaml, the backbone name and every dataset path without computing anything."""
    from polarocc.config import check_backbone_known, check_datasets_exist, load_params

    try:
        p = load_params(params)
        check_backbone_known(p)
        check_datasets_exist(p)
    except PolaroccError as exc:
        _fail(exc)
    variants = len(p.variants())
    categories = sum(len(d.categories) for d in p.datasets.values())
    typer.echo(f"ok: {len(p.datasets)} dataset(s), {categories} categories, {variants} center variants "
               f"({len(p.sweep.distributions)} distributions x {len(p.sweep.norms)} norms)")


@app.command()
def results(params: Path = PARAMS, dataset: str | None = typer.Option(None, help="only this dataset"),
            per_category: bool = typer.Option(False, "--per-category", help="one row per category")) -> None:
    """Print the results of the last `dvc repro` (reports/results.csv) as a table."""
    import polars as pl

    from polarocc.config import load_params
    from polarocc.pipeline import paths
    from polarocc.reports.tables import read_results, sweep_means

    try:
        p = load_params(params)
    except PolaroccError as exc:
        _fail(exc)
    csv = paths.reports(p) / "results.csv"
    if not csv.is_file():
        _fail(FileNotFoundError(f"{csv} does not exist yet: run `dvc repro` first"))
    table = read_results(csv)
    if dataset:
        table = table.filter(pl.col("dataset") == dataset)
    shown = table.select(["dataset", "category", "distribution", "norm", "image_auroc", "pixel_auroc"]) \
        if per_category else sweep_means(table)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, float_precision=4):
        typer.echo(shown)


@app.command("convert-visa")
def convert_visa_command(
    root: Annotated[Path, typer.Argument(help="the original VisA folder (holding split_csv/1cls.csv)")],
    out: Annotated[Path, typer.Argument(help="where to write the MVTec-layout copy")],
    category: Annotated[list[str] | None, typer.Option("--category", "-c", help="only these objects")] = None,
) -> None:
    """Convert VisA to MVTec AD layout (masks binarised); then set datasets.<name>.path to OUT."""
    from polarocc.data.visa import convert_visa

    try:
        counts = convert_visa(root, out, category or None)
    except PolaroccError as exc:
        _fail(exc)
    for obj, folders in counts.items():
        typer.echo(f"{obj}: " + ", ".join(f"{folder} {n}" for folder, n in folders.items()))


@app.command()
def weights() -> None:
    """Convert (once) and locate the offline EfficientNet-Lite0 ImageNet weights used by default."""
    from polarocc.models.weights import converted_package_weights

    try:
        typer.echo(str(converted_package_weights()))
    except PolaroccError as exc:
        _fail(exc)


if __name__ == "__main__":
    app()
