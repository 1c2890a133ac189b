"""Protocols compared: the paper's crop, the full frame and tiles on the embedded small-defect data.

Each geometry is one DVC experiment of the whole pipeline (``dvc exp run --temp``: the workspace is untouched)
on the same data and settings (``COMMON``); only ``backbone.resize/crop/tiles`` differ (``GEOMETRIES``). The
table is built from what each experiment committed (its ``reports/geometry.json`` and ``params.yaml``):

    python bench/geometry.py --run        # run the experiments (about 3 minutes each on 2 cores), then compare
    python bench/geometry.py              # compare experiments already run
    python bench/geometry.py --print-commands   # the `dvc exp run` commands, to run or queue by hand

Writes reports/geometry_comparison.json, reports/geometry_comparison.md and
reports/plots/geometry_comparison.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import polars as pl
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reporting import REPORTS, write_results  # noqa: E402
from polarocc.reports.geometry import geometry_table  # noqa: E402
from polarocc.reports.markdown import md_table  # noqa: E402

PREFIX = "geometry-"
# The small-defect data (1:2.5 images, 307 x 768 px) and a pipeline cut to what the comparison needs: one center
# variant, no peers, no online stream, the budget analysis at the final epoch only.
COMMON = [
    "embedded_data.variant=small_defects", "embedded_data.image_size=768", "embedded_data.crop=200",
    "embedded_data.train=32", "embedded_data.test_good=8", "embedded_data.defects_per_type=4",
    "sweep.norms=[1]", "sweep.distributions=[normal]", "peers.methods=[]", "protocol_c.datasets=[]",
    "analysis.budget_epochs=[50]", "analysis.tsne_points=100",
]
GEOMETRIES = {
    "paper": ["backbone.resize=256", "backbone.crop=224", "backbone.tiles=null"],
    # The aspect ratio kept and nothing cut, at a pixel budget near the paper's (179 x 448 = 80k vs 224^2 = 50k).
    "full_frame": ["backbone.resize={longer_side:448}", "backbone.crop=null", "backbone.tiles=null"],
    # Native resolution (307 x 768) in 224 px tiles: 10 tiles per image.
    "tiled": ["backbone.resize={longer_side:768}", "backbone.crop=null", "backbone.tiles={size:224,overlap:0.25}"],
    # Native resolution in one forward (what tiling approximates, when memory allows).
    "native": ["backbone.resize={longer_side:768}", "backbone.crop=null", "backbone.tiles=null"],
}


def command(name: str) -> list[str]:
    """The `dvc exp run` of one geometry."""
    sets = [arg for setting in COMMON + GEOMETRIES[name] for arg in ("-S", setting)]
    return ["dvc", "exp", "run", "--temp", "-n", PREFIX + name.replace("_", "-"), *sets]


def experiment_ref(name: str) -> str | None:
    """The newest git ref of the experiment named ``geometry-<name>`` (DVC keeps them under refs/exps)."""
    wanted = PREFIX + name.replace("_", "-")
    out = subprocess.run(["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return next((ref for ref in out if ref.rsplit("/", 1)[-1] == wanted), None)


def read_at(ref: str, path: str) -> str:
    return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout


def collect(names: list[str]) -> dict[str, Any]:
    """Per geometry: its params (backbone geometry) and reports/geometry.json, from the experiment's commit."""
    found: dict[str, Any] = {}
    for name in names:
        ref = experiment_ref(name)
        if ref is None:
            print(f"no experiment {PREFIX}{name} yet: run python bench/geometry.py --run", file=sys.stderr)
            continue
        params = yaml.safe_load(read_at(ref, "params.yaml"))
        found[name] = {"ref": ref, "backbone": {k: params["backbone"][k] for k in ("resize", "crop", "tiles")},
                       "metrics": json.loads(read_at(ref, "reports/geometry.json"))}
    return found


def comparison(found: dict[str, Any]) -> pl.DataFrame:
    return pl.concat([geometry_table(r["metrics"], name) for name, r in found.items()], how="diagonal_relaxed")


def summary(table: pl.DataFrame) -> pl.DataFrame:
    """Means over the categories per geometry."""
    numeric = [c for c in table.columns if c not in ("geometry", "dataset", "category", "input")]
    return table.group_by("geometry", maintain_order=True).agg(pl.col(numeric).mean().round(4),
                                                               pl.col("input").first())


def plot(table: pl.DataFrame, path: Path) -> None:
    """Mean image AUROC per defect type, one group of bars per type, a bar per geometry."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = summary(table)
    kinds = [c for c in means.columns if c.startswith("auroc_")]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(kinds), 3.6))
    width = 0.8 / max(means.height, 1)
    for i, row in enumerate(means.iter_rows(named=True)):
        ax.bar([k + i * width for k in range(len(kinds))], [row[k] for k in kinds], width,
               label=f"{row['geometry']} ({row['input']})")
    ax.set_xticks([k + width * (means.height - 1) / 2 for k in range(len(kinds))],
                  [k.removeprefix("auroc_") for k in kinds])
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("image ROC AUC vs good (category mean)")
    ax.set_title("Defects found per input geometry (small-defect data)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def to_markdown(result: dict) -> str:
    table, means = pl.DataFrame(result["rows"]), pl.DataFrame(result["means"])
    settings = "\n".join(f"- `{name}`: " + ", ".join(f"`{s}`" for s in GEOMETRIES[name]) for name in result["found"])
    return "\n".join([
        "# Input geometry compared (embedded small-defect data)", "",
        "Each geometry is a DVC experiment of the whole pipeline on the same data; only the backbone geometry "
        "differs. `auroc_<type>`: image ROC AUC of that defect type against the good images (`border`: defects "
        "touching the image border, mostly inside the margin a square resize + 87.5% center crop cuts; `tiny`: "
        "a few pixels at 768 px). Seconds and MiB are per image, for extraction (2 CPU cores here).", "",
        f"Common settings: {', '.join(f'`{s}`' for s in COMMON)}.", "", settings, "",
        "## Means over the categories", "", md_table(means), "",
        "## Per category", "", md_table(table), "",
        "![defects found per geometry](plots/geometry_comparison.png)", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="store_true", help="run the experiments first")
    parser.add_argument("--print-commands", action="store_true", help="print the dvc exp run commands and stop")
    parser.add_argument("--only", nargs="*", choices=sorted(GEOMETRIES), help="a subset of the geometries")
    args = parser.parse_args()
    names = args.only or list(GEOMETRIES)
    if args.print_commands:
        for name in names:
            print(" ".join(f"'{a}'" if "{" in a or "[" in a else a for a in command(name)))
        return
    if args.run:
        for name in names:
            print("$", " ".join(command(name)), flush=True)
            subprocess.run(command(name), cwd=ROOT, check=True)
    found = collect(names)
    if not found:
        raise SystemExit("no geometry experiment found")
    table = comparison(found)
    plot(table, REPORTS / "plots" / "geometry_comparison.png")
    result = {"found": list(found), "experiments": {n: {"ref": r["ref"], "backbone": r["backbone"]}
                                                    for n, r in found.items()},
              "means": summary(table).to_dicts(), "rows": table.to_dicts()}
    write_results("geometry_comparison", result, to_markdown)


if __name__ == "__main__":
    main()
