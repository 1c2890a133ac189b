"""Params validation: bad values stop with a message naming the key, before any work."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest

from polarocc.config import check_datasets_exist, load_params, parse_params
from polarocc.errors import ConfigError
from polarocc.models.backbone import check_model_name
from tests.conftest import ROOT, write_params


def test_default_params_are_valid(default_params: dict) -> None:
    params = parse_params(default_params)
    assert params.center.norm == 1 and params.center.seed == 1024
    assert params.sweep.norms == (1, 2, 4, 8, 16, 32, 64)
    assert len(params.variants()) == 28
    check_model_name(params.backbone.name)


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
        ("center", "seed", "abc", "center.seed"),
        ("train", "seed", "abc", "train.seed"),
        ("embedded_data", "seed", "abc", "embedded_data.seed"),
        ("protocol_c", "seed", -1, "protocol_c.seed"),
        ("extract", "level", -5, "extract.level"),
        ("extract", "level", 12, "extract.level"),  # lz4 (blosc) levels stop at 9
        ("score", "squared", "no", "score.squared"),
        ("projector", "bias", 1, "projector.bias"),
        ("center", "norm", float("nan"), "center.norm"),
        ("center", "norm", float("inf"), "center.norm"),
        ("score", "sigma", -1, "score.sigma"),
        ("backbone", "layers", [3, 1], "backbone.layers"),
        ("backbone", "layers", 3, "backbone.layers"),
        ("backbone", "mean", [0.5, 0.5], "backbone.mean"),
        ("backbone", "std", [0.5, 0.0, 0.5], "backbone.std"),
        ("extract", "scheduler", "cluster", "extract.scheduler"),
        ("sweep", "norms", [1, 1.0], "sweep.norms"),
        ("sweep", "norms", [], "sweep.norms"),
        ("embedded_data", "categories", ["brick", "marble"], "embedded_data.categories"),
        ("analysis", "budget_epochs", [5, 1], "analysis.budget_epochs"),
        ("peers", "coreset_ratio", 0, "peers.coreset_ratio"),
        ("deploy", "threshold_quantile", 1.5, "deploy.threshold_quantile"),
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
        check_model_name(parse_params(raw).backbone.name)


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


@pytest.mark.integration
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


def test_every_config_field_has_a_constraint() -> None:
    from dataclasses import fields

    from polarocc.config import CONFIG_CLASSES, SECTIONS, Rule

    assert set(SECTIONS.values()) <= set(CONFIG_CLASSES)
    for cls in CONFIG_CLASSES:
        names = {f.name for f in fields(cls)}
        assert set(cls.CONSTRAINTS) == names, f"{cls.__name__}: {set(cls.CONSTRAINTS) ^ names}"
        assert all(isinstance(rule, Rule) and rule.expected for rule in cls.CONSTRAINTS.values())


def test_shipped_params_spell_out_every_default(default_params: dict) -> None:
    from dataclasses import fields

    from polarocc.config import SECTIONS

    for section, cls in SECTIONS.items():
        missing = {f.name for f in fields(cls)} - set(default_params[section])
        assert not missing, f"params.yaml lacks {section}.{sorted(missing)}"
    for name, entry in default_params["datasets"].items():
        assert {"format", "path", "categories"} <= set(entry), name
    for name, entry in default_params["protocol_a"]["datasets"].items():
        assert {"format", "path", "classes"} <= set(entry), name


@pytest.mark.parametrize(("where", "name"), [("datasets", "../../x"), ("datasets", "a/b"),
                                             ("categories", "../../x"), ("categories", "..")])
def test_names_used_in_paths_are_plain(default_params: dict, where: str, name: str) -> None:
    raw = copy.deepcopy(default_params)
    if where == "datasets":
        raw["datasets"][name] = raw["datasets"]["textures"]
        key = f"datasets.{name}.name"
    else:
        raw["datasets"]["textures"]["categories"] = ["brick", name]
        key = "datasets.textures.categories"
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_params(raw)


def test_renamed_and_unknown_sections(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["textures"] = raw.pop("embedded_data")
    with pytest.raises(ConfigError, match="now called 'embedded_data'"):
        parse_params(raw)
    raw = copy.deepcopy(default_params)
    raw["trian"] = {"epochs": 3}
    with pytest.raises(ConfigError, match=r"unknown params section.*trian"):
        parse_params(raw)


@pytest.mark.parametrize("text", ["datasets: [\n  bad", "train: {epochs: 3\n", "\tcenter: 1\n"])
def test_malformed_yaml_is_one_line_naming_the_file(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_params(path)
    message = str(caught.value)
    assert str(path) in message and "not valid YAML" in message and "\n" not in message


def test_params_are_read_as_yaml_1_2_like_dvc_writes_them(tmp_path: Path) -> None:
    text = (ROOT / "params.yaml").read_text()
    text = text.replace("lr: 1.0e-4", "lr: 5e-05").replace("epochs: 50", "epochs: 010")
    path = tmp_path / "params.yaml"
    path.write_text(text)
    params = load_params(path)
    assert params.train.lr == 5e-05 and params.train.epochs == 10  # YAML 1.1 would give '5e-05' and 8
    path.write_text(text.replace("squared: true", "squared: off"))
    with pytest.raises(ConfigError, match=r"score\.squared.*got 'off'"):
        load_params(path)


def test_dataset_names_have_no_spaces_but_categories_may(default_params: dict) -> None:
    raw = copy.deepcopy(default_params)
    raw["datasets"]["my data"] = raw["datasets"]["textures"]
    with pytest.raises(ConfigError, match=r"datasets\.my data\.name.*without spaces"):
        parse_params(raw)
    raw = copy.deepcopy(default_params)
    raw["datasets"]["textures"]["categories"] = ["metal nut"]
    assert parse_params(raw).datasets["textures"].categories == ("metal nut",)
