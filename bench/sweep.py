"""Benchmark (not a test): Protocol A training of one norm, the part of a norm sweep that trains 40 digit models.

Times ``protocol_a.fit_all`` (every class x distribution at one norm) with the polarocc that PYTHONPATH points
at, so the same script times the code before and after a change. Run from a project root after
``dvc repro`` (it reads data/features/<dataset>/images):

    python bench/sweep.py --threads 1 --repeat 5           # median of 5 runs, one torch thread, one class at a time
    python bench/sweep.py --threads 2 --busy 1             # with one CPU-bound process beside it
    python bench/sweep.py --adam                           # Adam kernels: float64 agreement and speed
    python bench/sweep.py --dvc 1,3                        # time `dvc exp run -S sweep.norms=[1,3]` by stage

``--threads 0`` lets the code choose (``threads_for`` where it exists); ``--threads N`` stands in for its answer, so
code that trains classes side by side (``split_threads``) runs up to N classes at once, one torch thread each.
Prints one JSON line per setting.

``--dvc`` runs the experiment in the workspace (as a user would; run it where ``dvc status`` is clean, or it
times the other stages too), timestamps every stage DVC starts, then puts the workspace back: it removes the
experiment, restores params.yaml, dvc.lock and the .gitignore lines DVC added byte for byte (refusing if
someone edited other params meanwhile), writes back the small outputs (reports) of the stages that ran as they
were, deletes the outputs of norms the workspace did not have, checks out from the DVC cache the outputs of the
norms the experiment left out (DVC removes them) and stages again what git had staged. ``dvc status`` and
``git status`` are then what they were. DVC's run cache turns a repeat of the same sweep into a checkout (the
stage shows ``from_run_cache``): repeat with other new norms (``--dvc 1,3``, ``--dvc 1,5``, ...).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch


def _spin() -> None:
    while True:
        pass


def fit_all_seconds(norm: float, threads: int) -> tuple[float, float]:
    from polarocc.config import load_params
    from polarocc.detector import protocol_a

    params = load_params()
    if threads:
        torch.set_num_threads(threads)
        if hasattr(protocol_a, "threads_for"):  # this code picks its own count: override it
            protocol_a.threads_for = lambda *_, **__: threads
    start, cpu = time.perf_counter(), time.process_time()
    count = sum(1 for _ in protocol_a.fit_all(params, norm))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert count > 0
    return elapsed, cpu


def adam_report(steps: int = 400) -> dict:
    """Max relative difference of each kernel from the single-tensor one in float64, and ms per step."""
    from torch.optim.adam import adam

    def run(impl: str, params: list[torch.Tensor], grads, n: int) -> list[torch.Tensor]:
        exp_avg = [torch.zeros_like(p) for p in params]
        exp_avg_sq = [torch.zeros_like(p) for p in params]
        state_steps = [torch.tensor(0.0) for _ in params]
        for k in range(n):
            adam(params, grads(k, params), exp_avg, exp_avg_sq, [], state_steps, foreach=impl == "foreach",
                 fused=impl == "fused", capturable=False, differentiable=False, grad_scale=None, found_inf=None,
                 has_complex=False, amsgrad=False, beta1=0.9, beta2=0.999, lr=1e-2, weight_decay=5e-4, eps=1e-8,
                 maximize=False)
        return params

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 64, dtype=torch.float64, generator=generator),
             torch.randn(64, dtype=torch.float64, generator=generator)]
    target = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in start]
    noise = [[torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in start] for _ in range(steps)]

    def pull(k: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [2 * (p - t) + e for p, t, e in zip(params, target, noise[k], strict=True)]

    reference = run("single", [p.clone() for p in start], pull, steps)
    out: dict = {"steps": steps}
    for impl in ("foreach", "fused"):
        got = run(impl, [p.clone() for p in start], pull, steps)
        out[f"{impl}_max_rel_diff"] = max(float((a - b).abs().max() / b.abs().max())
                                          for a, b in zip(got, reference, strict=True))
    for shape in ((1280, 1280), (4, 1280, 1280), (4, 176, 176)):
        params = [torch.randn(*shape), torch.randn(shape[:-1])]
        grads = [torch.randn_like(p) for p in params]

        def fixed(*_, grads=grads) -> list[torch.Tensor]:
            return grads

        for impl in ("single", "foreach", "fused"):
            times = []
            for _ in range(5):
                run(impl, params, fixed, 2)
                t = time.perf_counter()
                run(impl, params, fixed, 10)
                times.append((time.perf_counter() - t) / 10 * 1e3)
            out[f"{impl}_ms_{'x'.join(map(str, shape))}"] = round(statistics.median(times), 3)
    return out


def _dvc_running(root: Path) -> list[str]:
    """Command lines of DVC processes working in ``root`` (other than this one's children)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if re.search(r"(^|/)dvc( |$)", cmdline.split(" -c ")[0]) and Path(cwd) == root:
            found.append(f"{proc.name}: {cmdline.strip()}")
    return found


def _lock_outs(lock: dict, stages: list[str] | None = None) -> list[str]:
    """Output paths that dvc.lock lists, of ``stages`` (every stage when None)."""
    return [out["path"] for name, stage in lock.get("stages", {}).items() if stages is None or name in stages
            for out in stage.get("outs", [])]


def _snapshot(root: Path, relative: list[str], limit: int = 50 * 2 ** 20) -> dict[str, dict[str, bytes]]:
    """Bytes of every file under each path (small outputs only: the reports; models and features are in
    the DVC cache)."""
    saved: dict[str, dict[str, bytes]] = {}
    for rel in relative:
        path = root / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
        if sum(f.stat().st_size for f in files) <= limit and not rel.startswith(("data/", "models/")):
            saved[rel] = {str(f.relative_to(root)): f.read_bytes() for f in files}
    return saved


def dvc_sweep(norms: list[float], name: str) -> dict:
    """Seconds of ``dvc exp run -S sweep.norms=[...]`` in the workspace, per stage DVC ran; the workspace is
    put back afterwards (see the module docstring)."""
    import yaml

    root = Path.cwd()
    others = _dvc_running(root)
    if others:
        raise SystemExit(f"DVC is running in {root}; retry when it is done:\n" + "\n".join(others))
    saved = {f: (root / f).read_bytes() for f in ("params.yaml", "dvc.lock")}
    ignores = {p: p.read_bytes() for p in root.rglob(".gitignore") if ".git" not in p.relative_to(root).parts[:-1]}
    outputs = _snapshot(root, _lock_outs(yaml.safe_load(saved["dvc.lock"])))
    staged = subprocess.run(["git", "diff", "--cached", "--name-only", "-z"], capture_output=True, text=True,
                            check=True).stdout.split("\0")
    index = [line for path in filter(None, staged) for line in subprocess.run(
        ["git", "ls-files", "-s", "--", path], capture_output=True, text=True, check=True).stdout.splitlines()]
    present = {name for name, stage in yaml.safe_load(saved["dvc.lock"]).get("stages", {}).items()
               if stage.get("outs") and all((root / out["path"]).exists() for out in stage["outs"])}
    norm_dirs = {p.name for p in (root / "models").glob("norm-*")}
    value = "[" + ",".join(f"{n:g}" for n in norms) + "]"
    command = ["dvc", "exp", "run", "-S", f"sweep.norms={value}", "--name", name]
    stages: list[dict] = []
    lines: list[str] = []
    rc = None
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in process.stdout:
            now = time.perf_counter() - start
            lines.append(line.rstrip())
            found = re.match(r"Running stage '([^']+)'|Stage '([^']+)' is cached", line)
            if found:
                if stages:
                    stages[-1]["s"] = round(now - stages[-1].pop("start"), 2)
                stages.append({"stage": found.group(1) or found.group(2), "start": now, "at_s": round(now, 2),
                               **({} if found.group(1) else {"from_run_cache": True})})
        rc = process.wait()
    finally:
        total = time.perf_counter() - start
        if stages and "start" in stages[-1]:
            stages[-1]["s"] = round(total - stages[-1].pop("start"), 2)
        before_first = stages[0]["at_s"] if stages else None
        ran = [s["stage"] for s in stages]
        restored = _restore(root, name, saved, ignores, outputs, norm_dirs, ran)
        restored += _restore_git_and_cache(root, saved, index, present)
    return {"bench": "dvc exp run", "command": " ".join(command), "rc": rc, "total_s": round(total, 2),
            "stages": stages, "stages_s": round(sum(s.get("s", 0.0) for s in stages), 2), "ran": ran,
            "before_first_stage_s": before_first, "restored": restored,
            "load": [round(x, 2) for x in os.getloadavg()], "tail": lines[-5:] if rc else []}


def _restore_git_and_cache(root: Path, saved: dict[str, bytes], index: list[str], present: set[str]) -> list[str]:
    """Stage again what was staged before (``dvc exp run`` resets the git index) and check out the cached
    outputs the experiment removed (the outputs of norms it did not sweep)."""
    import yaml

    done = []
    for line in index:  # "<mode> <object> <stage>\t<path>" of git ls-files -s
        meta, path = line.split("\t", 1)
        mode, blob, _ = meta.split()
        subprocess.run(["git", "update-index", "--add", "--cacheinfo", f"{mode},{blob},{path}"], check=True)
        done.append(f"staged {path} again")
    lock = yaml.safe_load(saved["dvc.lock"]).get("stages", {})
    missing = sorted(name for name in present if not all((root / o["path"]).exists() for o in lock[name]["outs"]))
    if missing:
        result = subprocess.run(["dvc", "checkout", *missing], capture_output=True, text=True)
        done.append(f"dvc checkout {' '.join(missing)}: rc {result.returncode}")
    return done


def _restore(root: Path, name: str, saved: dict[str, bytes], ignores: dict[Path, bytes],
             outputs: dict[str, dict[str, bytes]], norm_dirs: set[str], ran: list[str]) -> list[str]:
    """Put the workspace back as it was before the experiment (see the module docstring)."""
    import yaml

    def without_norms(text: bytes) -> dict:
        params = yaml.safe_load(text)
        params.get("sweep", {}).pop("norms", None)
        return params

    done = []
    removed = subprocess.run(["dvc", "exp", "remove", name], capture_output=True, text=True)
    done.append(f"dvc exp remove {name}: rc {removed.returncode}")
    if without_norms((root / "params.yaml").read_bytes()) != without_norms(saved["params.yaml"]):
        done.append("params.yaml changed beyond sweep.norms during the run: left as it is, restore it by hand")
        return done
    # The stages whose outputs the experiment wrote: those it ran or took from the run cache (``ran``) and any
    # whose lock entry it changed or added.
    original = yaml.safe_load(saved["dvc.lock"]).get("stages", {})
    changed = [name for name, entry in yaml.safe_load((root / "dvc.lock").read_bytes()).get("stages", {}).items()
               if name in ran or original.get(name) != entry]
    ran_outs = _lock_outs(yaml.safe_load((root / "dvc.lock").read_bytes()), changed)
    for file, content in saved.items():
        (root / file).write_bytes(content)
        done.append(f"restored {file}")
    for path, content in ignores.items():
        now = path.read_bytes() if path.is_file() else b""
        added = set(now.splitlines()) - set(content.splitlines())
        if now != content and all(b"norm-" in line for line in added):
            path.write_bytes(content)
            done.append(f"restored {path.relative_to(root)}")
    for rel in ran_outs:
        path = root / rel
        if rel in outputs:
            for file in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
                if file.is_file() and str(file.relative_to(root)) not in outputs[rel]:
                    file.unlink()
            for file, content in outputs[rel].items():
                (root / file).parent.mkdir(parents=True, exist_ok=True)
                (root / file).write_bytes(content)
            done.append(f"restored {rel}")
        elif rel.startswith("models/norm-") and Path(rel).name not in norm_dirs and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            done.append(f"removed {rel}")
        elif path.is_file() and rel.startswith("reports/"):
            path.unlink()
            done.append(f"removed {rel}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the code's own choice)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--busy", type=int, default=0, help="CPU-bound processes running beside the benchmark")
    parser.add_argument("--adam", action="store_true", help="benchmark the Adam kernels instead")
    parser.add_argument("--dvc", default="", help="comma-separated norms: time `dvc exp run -S sweep.norms=[...]`")
    args = parser.parse_args()
    if args.dvc:
        norms = [float(n) for n in args.dvc.split(",")]
        print(json.dumps(dvc_sweep(norms, f"bench-sweep-{os.getpid()}")))
        return
    spinners = [mp.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        if args.adam:
            torch.set_num_threads(args.threads or 1)
            print(json.dumps({"adam": adam_report(), "threads": args.threads or 1, "busy": args.busy}))
            return
        runs = [fit_all_seconds(args.norm, args.threads) for _ in range(args.repeat)]
        wall, cpu = [w for w, _ in runs], [c for _, c in runs]
        print(json.dumps({"bench": "protocol_a.fit_all", "norm": args.norm, "threads": args.threads,
                          "torch_threads_after": torch.get_num_threads(), "busy": args.busy,
                          "seconds": [round(t, 2) for t in wall], "median_s": round(statistics.median(wall), 2),
                          "cpu_median_s": round(statistics.median(cpu), 2)}))
    finally:
        for p in spinners:
            p.terminate()
            p.join()


if __name__ == "__main__":
    main()
