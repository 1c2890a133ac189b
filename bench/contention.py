"""Benchmark (not a test): the train stage's fitting of one norm, alone and with a second CPU-bound job beside it.

Two workloads, each the train stage's own code on the real feature stores:

* ``B``: :func:`polarocc.detector.stores.fit_store` of every category of the embedded ``textures`` dataset,
  every center distribution in lockstep (Lite0 layers 1-3: 176 channels; data/features/textures);
* ``B1``: ``B`` with fit_store's radius certificate run on the lockstep's torch threads (as it stands it runs on
  every core, outside fit_store's ``torch_threads`` block): the effect of that change to polarocc/training/fit.py;
* ``A``: :func:`polarocc.detector.protocol_a.fit_all` (every digit class x distribution, 1280 pooled channels;
  data/features/digits).

Each is timed alone and with one competing process: ``spin`` (a pure-Python busy loop, one core) and
``torch`` (a second training-like job: float64 matrix products on every core, as another stage would run).
Settings are interleaved (alone, spin, torch, alone, ...) so that the load of other jobs on the machine falls
on all of them alike; the report gives medians, the load average around each run, and the contended/alone
ratio against the issue's bound (3x). Run from a project root after ``dvc repro extract@textures
extract_a@digits``:

    python bench/contention.py                     # every workload, 3 repeats, norm 3
    python bench/contention.py --workloads B --repeat 5

Writes reports/bench_contention.json and reports/bench_contention.md (``--name`` another name; with
``PYTHONPATH=<tree>`` it times that tree's polarocc, e.g. the code before a change).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: PYTHONPATH=<other tree> times that tree's polarocc

from bench.reporting import write_results  # noqa: E402

BOUND = 3.0  # the limit on contended / alone
BUSY_KINDS = ("spin", "torch")


def _spin() -> None:
    while True:
        pass


def _torch_job() -> None:
    """A CPU-bound job that uses every core the way a training stage does: float64 products, torch's threads."""
    torch.set_num_threads(os.cpu_count() or 1)
    a = torch.randn(384, 384, dtype=torch.float64)
    while True:
        a = torch.tanh(a @ a.T / 384)


BUSY = {"spin": _spin, "torch": _torch_job}


def _loadavg() -> float:
    return round(os.getloadavg()[0], 2)


def workload_b(params, norm: float) -> tuple[Callable[[], int], dict]:
    """fit_store of every category of the textures dataset at ``norm``, every distribution."""
    from polarocc import layout
    from polarocc.detector.stores import fit_store, statistics_mode
    from polarocc.features.store import FeatureStore
    from polarocc.training.fit import step_flop
    from polarocc.training.threads import threads_for

    dataset = "textures"
    categories = params.datasets[dataset].categories
    stores = [FeatureStore(layout.feature_store(params, dataset, c)) for c in categories]
    distributions = tuple(params.sweep.distributions)
    streamed = statistics_mode(stores[0], params.train) == "streamed"
    info = {"dataset": dataset, "categories": list(categories), "channels": stores[0].channels,
            "train_images": [s.features("train").shape[0] for s in stores],
            "pixels_per_image": stores[0].pixels_per_image, "distributions": list(distributions),
            "statistics": "streamed" if streamed else "stored", "epochs": params.train.epochs,
            "batch_size": params.train.batch_size,
            "torch_threads": threads_for(step_flop(stores[0].channels, stores[0].pixels_per_image,
                                                     len(distributions), params.train, streamed))}

    def run() -> int:
        return sum(len(fit_store(store, params, norm, distributions, device="cpu")) for store in stores)

    return run, info


def workload_a(params, norm: float) -> tuple[Callable[[], int], dict]:
    """protocol_a.fit_all at ``norm``: every class of every Protocol A dataset, every distribution."""
    from polarocc import layout
    from polarocc.detector import protocol_a
    from polarocc.features.store import FeatureStore
    from polarocc.training.threads import split_threads, threads_for

    datasets = list(params.protocol_a.datasets)
    store = FeatureStore(layout.feature_store(params, datasets[0], protocol_a.STORE_NAME))
    features, labels, _ = protocol_a.load_split(store, "train")
    cfg = protocol_a.train_config(params)
    classes = protocol_a.chosen_classes(store, params.protocol_a.datasets[datasets[0]])
    largest = int(np.bincount(labels).max())
    flop = protocol_a.step_flop(len(params.sweep.distributions), min(cfg.batch_size, largest), features.shape[1])
    workers, threads = split_threads(threads_for(flop), len(classes))
    info = {"datasets": datasets, "channels": int(features.shape[1]), "train_images": len(features),
            "distributions": list(params.sweep.distributions), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "classes_at_once": workers, "torch_threads": threads}

    def run() -> int:
        return sum(1 for _ in protocol_a.fit_all(params, norm))

    return run, info


def workload_b1(params, norm: float) -> tuple[Callable[[], int], dict]:
    """``B`` with the radius certificate on the lockstep's thread count: what fit_store does when its
    ``torch_threads(threads_for(...))`` block covers the certificate too (it runs on every core as it stands)."""
    from polarocc.training import fit as train
    from polarocc.training.threads import torch_threads

    run, info = workload_b(params, norm)
    certify = train.certified_min_distance_sq

    def patched() -> int:
        def on_threads(*args, **kwargs):
            with torch_threads(info["torch_threads"]):
                return certify(*args, **kwargs)

        train.certified_min_distance_sq = on_threads
        try:
            return run()
        finally:
            train.certified_min_distance_sq = certify

    return patched, info


WORKLOADS = {"B": workload_b, "B1": workload_b1, "A": workload_a}
LABELS = {"B": "B: fit_store, textures (3 categories)",
          "B1": "B: fit_store, certificate on the lockstep's threads (proposed)",
          "A": "A: fit_all, digits (10 classes)"}


def timed(run: Callable[[], int], busy: str | None) -> dict:
    """Seconds (wall and this process's CPU) of one ``run()``, with a ``busy`` process beside it when given."""
    spinner = None
    if busy is not None:
        spinner = mp.get_context("spawn").Process(target=BUSY[busy], daemon=True)
        spinner.start()
        time.sleep(1.0)  # let it reach its busy loop (and, for torch, start its threads)
    try:
        load = _loadavg()
        start, cpu = time.perf_counter(), time.process_time()
        models = run()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    finally:
        if spinner is not None:
            spinner.terminate()
            spinner.join()
    return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "models": models, "load_before": load,
            "load_after": _loadavg()}


def bench(name: str, params, norm: float, repeat: int, busy_kinds: tuple[str, ...]) -> dict:
    run, info = WORKLOADS[name](params, norm)
    run()  # warm up: first-call costs (imports, allocator, reading the stores into the page cache)
    settings = ("alone", *busy_kinds)
    runs: dict[str, list[dict]] = {s: [] for s in settings}
    for _ in range(repeat):
        for setting in settings:
            runs[setting].append(timed(run, None if setting == "alone" else setting))
            print(f"{name} {setting}: {runs[setting][-1]}", flush=True)
    medians = {s: statistics.median(r["wall_s"] for r in runs[s]) for s in settings}
    ratios = {s: round(medians[s] / medians["alone"], 2) for s in busy_kinds}
    return {**info, "norm": norm, "runs": runs, "median_s": {s: round(m, 3) for s, m in medians.items()},
            "ratio": ratios, "pass": all(r <= BOUND for r in ratios.values())}


def to_markdown(result: dict) -> str:
    lines = ["# Training under CPU contention", "",
             f"{result['machine']}; polarocc from {result['polarocc']}; {result['repeat']} interleaved repeats, "
             "medians; load average "
             f"{result['load_start']} at start, {result['load_end']} at end. Bound: contended <= {BOUND:g} x alone.",
             "", "Competing process: `spin` = a pure-Python busy loop (one core); `torch` = float64 matrix "
             "products on every core (another training-like job).", "",
             "| workload | channels | variants | loops x torch threads | alone s | " +
             " | ".join(f"{k} s | {k} ratio" for k in result["busy_kinds"]) + " | verdict |",
             "|---|---:|---:|---:|---:|" + "---:|---:|" * len(result["busy_kinds"]) + "---|"]
    for name, r in result["workloads"].items():
        label = LABELS[name]
        cells = " | ".join(f"{r['median_s'][k]:.2f} | {r['ratio'][k]:.2f}x" for k in result["busy_kinds"])
        lines.append(f"| {label} | {r['channels']} | {len(r['distributions'])} | "
                     f"{r.get('classes_at_once', 1)} x {r['torch_threads']} | "
                     f"{r['median_s']['alone']:.2f} | {cells} | {'PASS' if r['pass'] else 'FAIL'} |")
    lines += ["", "Every run (wall s / CPU s of the timed process, load average before):", ""]
    for name, r in result["workloads"].items():
        for setting, runs in r["runs"].items():
            cells = ", ".join(f"{x['wall_s']:.2f}/{x['cpu_s']:.2f} (load {x['load_before']})" for x in runs)
            lines.append(f"- {name} {setting}: {cells}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workloads", default="B,B1,A",
                        help="comma-separated: B (textures), B1 (B, certificate on one thread), A (digits)")
    parser.add_argument("--busy", default=",".join(BUSY_KINDS), help="comma-separated competing processes")
    parser.add_argument("--name", default="bench_contention", help="reports/<name>.json and .md")
    args = parser.parse_args()
    import polarocc
    from polarocc.config import load_params

    os.chdir(ROOT)
    params = load_params()
    busy_kinds = tuple(k for k in args.busy.split(",") if k)
    unknown = [k for k in busy_kinds if k not in BUSY]
    if unknown:
        parser.error(f"unknown --busy kind(s) {unknown}; choose from {list(BUSY)}")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
                         f"{torch.__version__}", "repeat": args.repeat, "busy_kinds": list(busy_kinds),
              "load_start": [round(x, 2) for x in os.getloadavg()],
              "polarocc": str(Path(polarocc.__file__).parent), "workloads": {}}
    for name in args.workloads.split(","):
        result["workloads"][name] = bench(name, params, args.norm, args.repeat, busy_kinds)
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    result["pass"] = all(r["pass"] for r in result["workloads"].values())
    write_results(args.name, result, to_markdown)


if __name__ == "__main__":
    main()
