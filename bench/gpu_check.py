"""GPU path check (not a test): the same stage functions on ``cpu`` and on ``cuda``, results compared.

Two projects are built under ``--workdir`` from the project's params.yaml, identical but for the devices:

1. ``default``: the embedded textures (smaller than the default pipeline, ``--train`` images per category) with
   the offline Lite0 backbone, ``train.statistics: auto`` (stored at 176 channels);
2. ``wide``: ``wide_resnet50_2`` with ``backbone.weights: random`` (benchmark only), layers 1-3, 1792 channels,
   ``train.statistics: streamed``.

For each: extract, train and score one norm on the CPU, then on CUDA, and compare features (within float16
rounding: at most one unit in the last place of the larger value), trained weights (relative difference) and
image / pixel ROC AUC (within 1e-4). Prints a markdown report and exits 1 when a check fails. Without CUDA it
checks that asking for ``cuda`` is a clear error and exits 2.

    python bench/gpu_check.py --workdir /tmp/gpu_check --out reports/gpu_check.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from polarocc import layout
from polarocc.atomic import write_text
from polarocc.config import Params, load_params
from polarocc.detector.model_files import load_model
from polarocc.errors import ConfigError
from polarocc.features.store import FeatureStore
from polarocc.pipeline.extract import run_extract
from polarocc.pipeline.prepare import run_prepare
from polarocc.pipeline.score import run_score
from polarocc.pipeline.train import run_train

ROOT = Path(__file__).resolve().parents[1]
AUROC_TOLERANCE = 1e-4
NORM = 1.0


def project_params(kind: str, device: str, train_images: int, epochs: int) -> dict:
    """The project's params reduced to one dataset (no Protocol A), with every stage on ``device``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    categories = ["brick"] if kind == "wide" else ["brick", "grass"]
    raw["datasets"] = {"textures": {"format": "mvtec", "path": "data/textures", "categories": categories}}
    raw["embedded_data"].update(categories=categories, train=train_images, test_good=max(train_images // 4, 2),
                                defects_per_type=max(train_images // 16, 1))
    raw["protocol_a"]["datasets"] = {}
    raw["protocol_c"]["datasets"] = []
    raw["sweep"] = {"norms": [NORM], "distributions": ["normal", "uniform"]}
    raw["train"].update(epochs=epochs, device=device)
    raw["extract"]["device"] = device
    raw["score"]["device"] = device
    if kind == "wide":
        raw["backbone"].update(name="wide_resnet50_2", weights="random", layers=[1, 2, 3])
        raw["train"]["statistics"] = "streamed"
    return raw


def run_project(folder: Path, raw: dict) -> tuple[Params, dict, float]:
    """prepare, extract, train and score one norm in ``folder``; (params, scores, seconds)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(folder / "params.yaml")
    start = time.perf_counter()
    run_prepare(params)
    run_extract(params, "textures", progress=False)
    run_train(params, NORM, progress=False)
    scores = run_score(params, NORM, progress=False)
    return params, scores, time.perf_counter() - start


def float16_ulps(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference in units of the last place of float16 at the larger magnitude."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    spacing = np.spacing(np.maximum(np.abs(a), np.abs(b)).astype(np.float16)).astype(np.float64)
    return float(np.max(np.abs(a64 - b64) / spacing)) if a.size else 0.0


def compare(kind: str, cpu: Params, cuda: Params, cpu_scores: dict, cuda_scores: dict) -> list[tuple[str, str, bool]]:
    """(check, measured, passed) rows for one project."""
    rows = []
    for category in cpu.datasets["textures"].categories:
        a = FeatureStore(layout.feature_store(cpu, "textures", category))
        b = FeatureStore(layout.feature_store(cuda, "textures", category))
        for split in ("train", "test"):
            ulps = float16_ulps(a.features(split)[:], b.features(split)[:])
            rows.append((f"{kind} {category} {split} features", f"{ulps:.1f} float16 ulp", ulps <= 1.0))
        for distribution in cpu.sweep.distributions:
            pa, _, _ = load_model(layout.model_file(cpu, NORM, distribution, "textures", category))
            pb, _, _ = load_model(layout.model_file(cuda, NORM, distribution, "textures", category))
            diff = float((pa.weight - pb.weight).norm() / pa.weight.norm())
            rows.append((f"{kind} {category} {distribution} weights", f"{diff:.2e} relative", diff <= 1e-3))
            ra = cpu_scores[distribution]["textures"][category]
            rb = cuda_scores[distribution]["textures"][category]
            for metric in ("image_auroc", "pixel_auroc"):
                delta = abs(ra[metric] - rb[metric])
                rows.append((f"{kind} {category} {distribution} {metric}",
                             f"{ra[metric]:.6f} vs {rb[metric]:.6f}", delta <= AUROC_TOLERANCE))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/polarocc_gpu_check"))
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu_check.md")
    parser.add_argument("--train", type=int, default=32, help="training images per category")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--devices", default="cpu,cuda",
                        help="the two devices compared (cpu,cpu checks this script itself on a machine without CUDA)")
    args = parser.parse_args()
    devices = tuple(args.devices.split(","))
    if "cuda" in devices and not torch.cuda.is_available():
        try:
            with_cuda = project_params("default", "cuda", 4, 1)
            folder = args.workdir / "no_cuda"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "params.yaml").write_text(yaml.safe_dump(with_cuda, sort_keys=False))
            from polarocc.pipeline.validate import run_validate

            run_validate(load_params(folder / "params.yaml"))
        except ConfigError as exc:
            print(f"no CUDA device; asking for cuda fails clearly: {exc}")
            return 2
        print("no CUDA device, and asking for cuda did NOT fail")
        return 1
    if args.workdir.exists() and not (args.workdir / ".polarocc_gpu_check").exists():
        sys.exit(f"{args.workdir} exists and was not made by this script: choose another --workdir")
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    (args.workdir / ".polarocc_gpu_check").touch()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = ["# GPU check", "", f"- devices {' vs '.join(devices)}; GPU: {gpu}, torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, {platform.node()}",
             f"- {args.train} training images per category, {args.epochs} epochs, norm {NORM:g}", "",
             "| check | measured | pass |", "|---|---|---|"]
    ok = True
    for kind in ("default", "wide"):
        results = {}
        for index, device in enumerate(devices):
            raw = project_params(kind, device, args.train, args.epochs)
            params, scores, seconds = run_project(args.workdir / f"{kind}-{index}-{device}", raw)
            results[index] = (params, scores)
            lines.insert(4, f"- {kind} on {device}: {seconds:.1f} s (prepare, extract, train, score)")
            print(f"{kind} on {device}: {seconds:.1f} s", flush=True)
        for check, measured, passed in compare(kind, results[0][0], results[1][0], results[0][1], results[1][1]):
            ok &= passed
            lines.append(f"| {check} | {measured} | {'yes' if passed else 'NO'} |")
    lines += ["", f"**{'all checks pass' if ok else 'SOME CHECKS FAIL'}**", ""]
    write_text(args.out, "\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
