"""Stage time estimates: the cost model's units scale with the work each param asks for, a calibration reproduces
the benchmark it came from, the shipped costs cover every part, and `polarocc plan` prints the estimates."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from polarocc.cli import app
from polarocc.config import load_params
from polarocc.planning import human_seconds, make_plan
from polarocc.timing import (
    STAGE_PARTS,
    CostModel,
    MeasuredRun,
    Workload,
    calibrate,
    shipped_costs,
    stage_family,
    stage_items,
    stage_units,
    with_stage_times,
)
from tests.conftest import write_params


def _params(params_dict: dict, folder: Path, **sections: dict):
    raw = copy.deepcopy(params_dict)
    for section, values in sections.items():
        raw[section].update(values)
    folder.mkdir(parents=True, exist_ok=True)
    return load_params(write_params(raw, folder))


def _workload(train: int = 1000, test: int = 250, categories: int = 1) -> Workload:
    return Workload(categories=(("textures", train, test),) * categories, a_images=1797, forward_pixels=224 * 224,
                    map_pixels=224 * 224, positions=56 * 56, channels=176, a_forward_pixels=64 * 64,
                    embedded_images=categories * (train + test))


def test_stage_names_and_durations_read_as_people_write_them() -> None:
    assert stage_family("train@16") == "train" and stage_family("extract_a@digits") == "extract_a"
    assert stage_family("report") == "report"
    assert [human_seconds(s) for s in (42.4, 185, 7800)] == ["42 s", "3 min 5 s", "2 h 10 min"]


def test_units_grow_with_the_work_each_param_asks_for(params_dict: dict, tmp_path: Path) -> None:
    params = _params(params_dict, tmp_path / "a", peers={"bank_limit": 250_000})
    small, large = stage_units(params, _workload(1000)), stage_units(params, _workload(10_000))
    assert large["train"]["training step"] == pytest.approx(10 * small["train"]["training step"], rel=0.01)
    # Export retrains without the held-out images; holdout 0 retrains nothing and scores every training image.
    assert "training step" in small["export"]
    no_holdout = _params(params_dict, tmp_path / "e", deploy={"holdout": 0})
    assert stage_units(no_holdout, _workload())["export"] == {"scored map (224 px)": 1000}
    assert large["extract"]["backbone image (224 px)"] > small["extract"]["backbone image (224 px)"]
    # The coreset stops growing once the held bank reaches bank_limit: its cost is bounded however large the data.
    assert large["peers"]["coreset step x vector x dim"] == small["peers"]["coreset step x vector x dim"]
    paper = _params(params_dict, tmp_path / "b", peers={"bank_limit": None})
    unbounded = stage_units(paper, _workload(10_000))["peers"]["coreset step x vector x dim"]
    assert unbounded == pytest.approx(large["peers"]["coreset step x vector x dim"] * (31_360_000 / 250_000) ** 2,
                                      rel=1e-3)
    # Sampled learning-curve checkpoints: fewer scored maps than one full split per checkpoint.
    whole = _params(params_dict, tmp_path / "c", protocol_c={"curve_test_images": 0},
                    analysis={"budget_test_images": 0})
    assert stage_units(whole, _workload())["online"]["curve map (224 px)"] > small["online"]["curve map (224 px)"]
    assert stage_units(whole, _workload())["analyze"]["curve map (224 px)"] > small["analyze"]["curve map (224 px)"]
    fewer = _params(params_dict, tmp_path / "d", sweep={"norms": [1], "distributions": ["normal"]})
    assert stage_items(fewer)["train"] == 1
    assert stage_units(fewer, _workload())["score"]["scored map (224 px)"] == 250


def test_calibration_reproduces_both_measured_runs(params_dict: dict, tmp_path: Path) -> None:
    params = _params(params_dict, tmp_path)
    items = stage_items(params)
    small, large = _workload(64, 40, categories=3), _workload()

    def seconds(workload: Workload, name: str, i: int) -> float:  # a made-up truth: per run + per unit, per stage
        return (2.0 + i) * max(1, items[name]) + 1e-3 * (i + 1) * sum(stage_units(params, workload)[name].values())

    runs = [MeasuredRun(params, w, {n: {"seconds": seconds(w, n, i), "items": items[n]}
                                    for i, n in enumerate(STAGE_PARTS) if items[n]}) for w in (large, small)]
    coreset = {"coreset step x vector x dim": 1e-11, "search position x vector x channel": 1e-12}
    costs = calibrate(runs, coreset)
    assert costs["rates"]["coreset step x vector x dim"] == 1e-11  # a part timed on its own is kept as measured
    model = CostModel(costs["per_run"], costs["rates"], {})
    # A stage whose parts it was the first to have is reproduced exactly on both runs.
    owner: dict[str, str] = {}
    for name in STAGE_PARTS:
        for part in stage_units(params, large)[name]:
            owner.setdefault(part, name)
    own = [n for n in runs[0].stages if all(owner[p] == n for p in stage_units(params, large)[n])
           and n != "peers"]
    assert {"train", "score", "extract", "online", "report"} <= set(own)
    for run in runs:
        estimate = model.estimate(params, run.workload)
        for name in own:
            assert estimate[name]["seconds"] == pytest.approx(run.stages[name]["seconds"], abs=0.1), name
    # Ten times the images: the image-proportional stages take longer, the fixed ones do not.
    ten = model.estimate(params, _workload(10_000, 2_500))
    base = model.estimate(params, large)
    assert ten["train"]["seconds"] > 5 * base["train"]["seconds"] - 5 * items["train"] * costs["per_run"]["train"]
    assert ten["report"]["seconds"] == base["report"]["seconds"]


def test_shipped_costs_price_every_part(params_dict: dict, tmp_path: Path) -> None:
    costs = shipped_costs()
    assert costs.per_run["validate_backbone"] > 0 and costs.source["source"] == "bench/runtime.py"
    assert len(costs.source["runs"]) == 2  # fitted to the large category and the default data
    params = _params(params_dict, tmp_path)
    parts = {part for units in stage_units(params, _workload()).values() for part in units}
    assert parts <= set(costs.rates), parts - set(costs.rates)
    assert all(rate >= 0 for rate in costs.rates.values())


def test_plan_prints_the_expected_time_of_each_stage(extracted_project: Path, tmp_path: Path) -> None:
    params = str(extracted_project / "params.yaml")
    result = CliRunner().invoke(app, ["plan", "--params", params])
    assert result.exit_code == 0, result.output
    assert "expected time:" in result.output and "shorter with" in result.output
    assert "peers.bank_limit" in result.output
    data = json.loads(CliRunner().invoke(app, ["plan", "--params", params, "--json"]).output)
    assert set(data["stages"]) >= {"extract", "train", "score", "peers", "analyze"}
    assert data["expected_seconds"] == pytest.approx(sum(s["seconds"] for s in data["stages"].values()), abs=0.5)


def test_plan_warns_about_a_stage_that_would_take_hours(extracted_project: Path) -> None:
    params = load_params(extracted_project / "params.yaml")
    plan = make_plan(params)
    slow = CostModel(shipped_costs().per_run, {**shipped_costs().rates, "coreset step x vector x dim": 1.0}, {})
    warned = with_stage_times(replace(params, peers=replace(params.peers, bank_limit=None)), plan, slow)
    assert any(n.startswith("peers is expected to take") and "peers.bank_limit" in n for n in warned.notes)


def test_plan_without_readable_costs_still_plans(extracted_project: Path, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from polarocc import timing

    broken = tmp_path / "stage_costs.json"
    broken.write_text("{not json")
    monkeypatch.setattr(timing, "COSTS_FILE", broken)
    monkeypatch.setattr(timing, "shipped_costs", lambda: CostModel.load(broken))
    params = load_params(extracted_project / "params.yaml")
    plan = with_stage_times(params, make_plan(params))
    assert not plan.stages and any(n.startswith("no time estimates:") for n in plan.notes)
