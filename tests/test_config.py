"""Params validation: bad values stop with a message naming the key, before any work."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from polarocc.config import check_backbone_known, check_datasets_exist, load_params, parse_params
from polarocc.errors import ConfigError
from tests.conftest import ROOT, write_params


def test_default_params_are_valid(default_params: dict) -> None:
    params = parse_params(default_params)
    assert params.center.norm == 1 and params.center.seed == 1024
    assert params.sweep.norms == (1, 2, 4, 8, 16, 32, 64)
    assert len(params.variants()) == 28
    check_backbone_known(params)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("sweep", "norms", [1, -2], "sweep.norms[1]"),
        ("center", "norm", 0, "center.norm"),
        ("sweep", "distributions", ["normal", "cauchy"], "sweep.distributions"),
        ("center", "distribution", "cauchy", "center.distribution"),
        ("score", "reduction", "median", "score.reduction"),
        ("train", "epochs", 0, "train.epochs"),
        ("train", "lr", -1.0, "train.lr"),
        ("backbone", "pool", 2, "backbone.pool"),
        ("backbone", "crop", 512, "backbone.crop"),
        ("projector", "kind", "mlp", "projector.kind"),
        ("extract", "dtype", "int8", "extract.dtype"),
        ("score", "metrics_memory_mb", -1, "score.metrics_memory_mb"),
        ("score", "metrics_memory_mb", 1.5, "score.metrics_memory_mb"),
        ("train", "stats_memory_mb", 0, "train.stats_memory_mb"),
    ],
)
def test_bad_value_names_key(default_params: dict, section: str, key: str, value: object, message: str) -> None:
    raw = copy.deepcopy(default_params)
    raw[section][key] = value
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_params(raw)


def test_unknown_key_is_rejected(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["train"]["learning_rate"] = 0.1
    with pytest.raises(ConfigError, match=r"train.learning_rate"):
        parse_params(raw)


def test_default_variant_must_be_in_sweep(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["sweep"]["norms"] = [2, 4]
    with pytest.raises(ConfigError, match=r"center.norm"):
        parse_params(raw)


def test_unknown_backbone(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["backbone"]["name"] = "resnet9000"
    with pytest.raises(ConfigError, match=r"backbone.name.*resnet9000"):
        check_backbone_known(parse_params(raw))


def test_missing_dataset_path(default_params: dict, tmp_path: Path) -> None:
    raw = copy.deepcopy(default_params)
    raw["datasets"]["mvtec"] = {"path": str(tmp_path / "nowhere"), "categories": ["bottle"]}
    with pytest.raises(ConfigError, match=r"datasets.mvtec.path.*nowhere"):
        check_datasets_exist(parse_params(raw))


def test_missing_category(default_params: dict, mvtec_tree: Path) -> None:
    raw = copy.deepcopy(default_params)
    raw["datasets"]["mine"] = {"path": str(mvtec_tree), "categories": ["brick", "carpet"]}
    with pytest.raises(ConfigError, match=r"carpet.*found brick, gravel"):
        check_datasets_exist(parse_params(raw))


def test_generated_dataset_path_may_be_absent(params_dict: dict, tmp_path: Path) -> None:
    check_datasets_exist(load_params(write_params(params_dict, tmp_path)))


@pytest.mark.parametrize("stage", ["prepare.py", "extract.py textures"])
def test_stage_stops_on_bad_params_before_work(params_dict: dict, tmp_path: Path, stage: str) -> None:
    params_dict["sweep"]["norms"] = [1, -4]
    write_params(params_dict, tmp_path)
    script, *args = stage.split()
    result = subprocess.run([sys.executable, str(ROOT / "stages" / script), *args], cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "sweep.norms[1]" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


def test_protocol_dataset_mismatch(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["datasets"]["cifar"] = {"format": "cifar10", "path": "x", "categories": ["cat"]}
    with pytest.raises(ConfigError, match=r"datasets.cifar.format.*no pixel masks.*protocol_a.datasets"):
        parse_params(raw)
