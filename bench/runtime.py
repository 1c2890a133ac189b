"""The whole default pipeline on a category of realistic size: wall seconds and peak memory of every stage.

A fresh git + DVC project in a temporary folder gets this repository's pipeline and code and the default
params.yaml, with one change: the embedded generator writes one category (``brick``) of ``--train`` training
and ``--test`` test images (a quarter good, the rest split over the four defect types, with masks). One
``dvc repro`` runs there; the benchmark reads DVC's "Running stage" lines as they come, so a stage's time runs
from its line to the next one (DVC's caching of its outputs included), and samples the resident memory of the
whole process tree (DVC and the stage's processes) every 0.1 s.

    python bench/runtime.py                  # 1,000 train + 250 test images (about 15 minutes on 2 cores)
    python bench/runtime.py --train 200 --test 50 --keep /tmp/runtime   # smaller, keep the project

Writes reports/bench_runtime.json and reports/bench_runtime.md. The per-unit costs that `polarocc plan`
turns into stage estimates are derived from this run (``costs`` in the JSON); ``--write-costs`` also stores
them in polarocc/stage_costs.json, the copy that ships with the package. DVC's output goes to
reports/bench_runtime.log.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.reporting import write_results  # noqa: E402
from polarocc.atomic import write_json  # noqa: E402
from polarocc.config import Params, load_params  # noqa: E402
from polarocc.peers.patchcore import PatchCore, coreset_size, greedy_coreset  # noqa: E402
from polarocc.planning import make_plan  # noqa: E402
from polarocc.timing import COSTS_FILE, MeasuredRun, Workload, calibrate, stage_family  # noqa: E402

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
CATEGORY = "brick"
TARGET_SECONDS = 15 * 60


def benchmark_params(train: int, test: int) -> dict:
    """The default params with one embedded category of ``train`` + ``test`` images."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = copy.deepcopy(raw)
    good = test // 4
    per_type, rest = divmod(test - good, len(raw["embedded_data"]["defect_types"]))
    raw["embedded_data"].update(categories=[CATEGORY], train=train, test_good=good + rest, defects_per_type=per_type)
    raw["datasets"]["textures"]["categories"] = [CATEGORY]
    return raw


def make_project(raw: dict, folder: Path) -> Path:
    """A git + DVC project in the new folder ``folder`` with this repository's pipeline and code."""
    folder.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, folder)
    for name in ("stages", "polarocc"):
        shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    (folder / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(args, cwd=folder, check=True)
    return folder


class TreeMemory:
    """Samples the summed resident memory of a process and its descendants; ``take()`` returns the peak since
    the last call."""

    def __init__(self, pid: int, every: float = 0.1) -> None:
        self.process = psutil.Process(pid)
        self.every = every
        self.peak = 0
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            total = 0
            try:
                for p in [self.process, *self.process.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            except psutil.Error:
                return
            with self.lock:
                self.peak = max(self.peak, total)

    def take(self) -> float:
        with self.lock:
            peak, self.peak = self.peak, 0
        return peak / 2 ** 20

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def run_pipeline(project: Path, log: Path) -> tuple[dict[str, dict], float]:
    """``dvc repro`` in ``project``: ({stage item: {seconds, peak_rss_mb}}, total seconds)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(["dvc", "repro"], cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    memory = TreeMemory(proc.pid)
    items: dict[str, dict] = {}
    current, since = None, start

    def close(now: float) -> None:
        if current is not None:
            items[current] = {"seconds": now - since, "peak_rss_mb": memory.take()}

    with log.open("w") as out:
        for line in proc.stdout:
            out.write(line)
            match = STAGE_LINE.search(line)
            if match:
                now = time.perf_counter()
                close(now)
                current, since = match.group(1), now
                print(f"[{now - start:7.1f} s] {current}", flush=True)
    rc = proc.wait()
    end = time.perf_counter()
    close(end)
    memory.stop()
    if rc != 0:
        raise SystemExit(f"dvc repro failed (exit {rc}); its output is in {log}")
    return items, end - start


def by_stage(items: dict[str, dict]) -> dict[str, dict]:
    """Stage items (``train@1``, ``extract@textures``) summed per pipeline stage; memory is the largest peak."""
    stages: dict[str, dict] = {}
    for name, item in items.items():
        entry = stages.setdefault(stage_family(name), {"seconds": 0.0, "peak_rss_mb": 0.0, "items": 0})
        entry["seconds"] += item["seconds"]
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], item["peak_rss_mb"])
        entry["items"] += 1
    return {k: {**v, "seconds": round(v["seconds"], 2), "peak_rss_mb": round(v["peak_rss_mb"], 1)}
            for k, v in stages.items()}


def patchcore_rates(params: Params, workload: Workload) -> dict[str, float]:
    """Seconds per unit of PatchCore's coreset selection and nearest-neighbour search, timed on their own on a
    random bank of the size this run held (the difference of two step counts, so the projection is not counted)."""
    torch.set_num_threads(os.cpu_count() or 1)
    pe = params.peers
    _, train, _ = workload.categories[0]
    held = min(train * workload.positions, pe.bank_limit or train * workload.positions)
    bank = torch.randn(held, workload.channels, generator=torch.Generator().manual_seed(0))
    dim = min(pe.projection_dim, workload.channels)

    def coreset_seconds(steps: int) -> float:
        start = time.perf_counter()
        greedy_coreset(bank, steps, pe.projection_dim)
        return time.perf_counter() - start

    few, many = 20, 220
    coreset_seconds(few)  # warm-up
    coreset = (coreset_seconds(many) - coreset_seconds(few)) / ((many - few) * held * dim)
    peer = PatchCore(k=pe.k)
    peer.bank = bank[:coreset_size(pe.coreset_ratio, held)].contiguous()
    features = torch.randn(16, workload.channels, 64, 64)
    start = time.perf_counter()
    peer.distance_maps(features)
    search = (time.perf_counter() - start) / (16 * 64 * 64 * len(peer.bank) * workload.channels)
    return {"coreset step x vector x dim": coreset, "search position x vector x channel": search}


def to_markdown(result: dict) -> str:
    lines = [
        f"# The default pipeline on {result['images']['train']:,} training + {result['images']['test']:,} test images",
        "",
        f"`python bench/runtime.py`: one `dvc repro` of the default params with the embedded `{CATEGORY}` category at "
        f"that size (plus the digits of Protocol A, as in the default). {result['machine']}.",
        "",
        "| stage | runs | seconds | share | peak RSS (MiB) | default data: seconds |",
        "|---|---|---|---|---|---|",
    ]
    total = result["total_seconds"]
    default = result.get("default_data", {"stages": {}, "total_seconds": float("nan")})
    for name, s in result["stages"].items():
        small = default["stages"].get(name, {}).get("seconds", float("nan"))
        lines.append(f"| {name} | {s['items']} | {s['seconds']:.1f} | {100 * s['seconds'] / total:.0f} % | "
                     f"{s['peak_rss_mb']:.0f} | {small:.1f} |")
    verdict = "within" if total <= TARGET_SECONDS else "over"
    lines += [f"| **total** | | **{total:.1f}** ({total / 60:.1f} min) | | | {default['total_seconds']:.1f} |", "",
              "The last column is the default params.yaml as is (3 categories of 64 training and 40 test images, "
              "plus the digits), timed the same way: the second run the cost model of `polarocc plan` is fitted "
              "to.", "",
              f"Target: {TARGET_SECONDS // 60} minutes on 2 cores: **{verdict}**. The time of a stage runs from DVC's "
              "\"Running stage\" line to the next one, so it includes DVC's caching of the outputs; peak RSS is the "
              "summed resident memory of DVC and the stage's processes (sampled every 0.1 s).", ""]
    return "\n".join(lines)


def timed_run(raw: dict, folder: Path, log: Path) -> tuple[dict[str, dict], float, MeasuredRun]:
    """``dvc repro`` of ``raw`` in a new project at ``folder``: (stage items, total seconds, the run for the cost
    model: its params, workload and stages)."""
    project = make_project(raw, folder)
    items, total = run_pipeline(project, log)
    params = load_params(project / "params.yaml")
    return items, total, MeasuredRun(params, Workload.of(params, make_plan(params)), by_stage(items))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=1000, help="training images (default 1000)")
    parser.add_argument("--test", type=int, default=250, help="test images (default 250)")
    parser.add_argument("--keep", type=Path, help="build the projects in this new folder and keep them")
    parser.add_argument("--skip-default", action="store_true",
                        help="do not also time the default data (the cost model then has one run to fit)")
    parser.add_argument("--write-costs", action="store_true",
                        help=f"also store the derived per-unit costs in {COSTS_FILE.relative_to(ROOT)}")
    args = parser.parse_args()
    folder = args.keep or Path(tempfile.mkdtemp(prefix="polarocc-runtime-"))
    if args.keep is not None and folder.exists():
        raise SystemExit(f"{folder} exists; give a new folder to --keep")
    # The logs live outside the temporary projects, so a failed run can still be read.
    logs = ROOT / "reports"
    try:
        items, total, large = timed_run(benchmark_params(args.train, args.test), folder / "large",
                                        logs / "bench_runtime.log")
        runs = [large]
        default = None
        if not args.skip_default:
            default_raw = yaml.safe_load((ROOT / "params.yaml").read_text())
            _, default_total, default = timed_run(default_raw, folder / "default",
                                                  logs / "bench_runtime_default.log")
            runs.append(default)
        costs = calibrate(runs, patchcore_rates(large.params, large.workload))
    finally:
        if args.keep is None:
            shutil.rmtree(folder)
    result = {
        "stages": by_stage(items), "total_seconds": round(total, 2),
        "images": {"train": args.train, "test": args.test},
        "items": {k: {"seconds": round(v["seconds"], 2), "peak_rss_mb": round(v["peak_rss_mb"], 1)}
                  for k, v in items.items()},
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, Python "
                   f"{platform.python_version()}",
        "costs": costs,
    }
    if default is not None:
        result["default_data"] = {"stages": default.stages, "total_seconds": round(default_total, 2),
                                  "images": {"train": default.workload.b_train, "test": default.workload.b_test}}
    write_results("bench_runtime", result, to_markdown)
    if args.write_costs:
        write_json(COSTS_FILE, {"source": "bench/runtime.py", "machine": result["machine"],
                                "runs": [result["images"]] + ([result["default_data"]["images"]] if default else []),
                                "costs": costs})
        print(f"wrote {COSTS_FILE}")
    print(json.dumps({"total_seconds": result["total_seconds"]}))


if __name__ == "__main__":
    main()
