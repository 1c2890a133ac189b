"""The online use case: score each image of a stream, then learn from it if it looks normal.

Test-then-train: every image is scored by the model as it was *before* seeing it (a prequential score),
the decision is made, and only then (and only for images judged normal, unless the stream is declared
clean) the projector takes one Adam step with batch size 1, the same step as Protocol C's trainer.

The run can stop at any moment and resume: after every ``save_every`` images the projector, the
optimizer's moments, the threshold window and the CSV length are written atomically to a state file.
On resume the CSV is cut back to that length, so rows and updates after the last save are redone
exactly once. A state file or CSV that polarocc cannot recognise as its own is never truncated or deleted,
not even with ``--restart``.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from polarocc.atomic import torch_save_atomic
from polarocc.config import Params
from polarocc.data.images import image_size, load_image
from polarocc.detector.artefact import ModelArtefact, Threshold, save_artefact, score_settings
from polarocc.detector.detector import Detector
from polarocc.detector.threshold import quantile_threshold, stream_quantile_threshold
from polarocc.errors import ConfigError, DataError, ModelError, UnsafePathError
from polarocc.models.backbone import FeatureExtractor, backbone_record, build_extractor
from polarocc.models.centers import make_center
from polarocc.models.projector import Projector
from polarocc.models.tiling import for_geometry
from polarocc.safe_load import torch_load_plain
from polarocc.training.direct import hinge_loss
from polarocc.training.optim import Adam

STATE_FORMAT = "polarocc-stream-state"
COLUMNS = ["index", "path", "score", "threshold", "decision", "learned", "updates"]
HEADER = ",".join(COLUMNS)  # the first line of every CSV a stream writes (csv.writer adds "\r\n")
# What to do with a state file polarocc cannot resume from and must not delete.
STATE_FIX = ("pass --restart to start over (a state file polarocc cannot read is kept, renamed to "
             "<name>.unreadable), or choose another --state")


@dataclass(frozen=True)
class StreamSettings:
    """How the stream decides and learns; a resumed run must use the same settings."""

    clean: bool = False  # learn from every image (the stream is known to hold only normal images)
    threshold: float | None = None  # a fixed threshold on the score scale
    quantile: float | None = None  # adaptive: this quantile of the last `window` learned images' scores
    window: int = 64
    warmup: int = 0  # the first images are taken as normal whatever they score
    lr: float = 1e-4
    weight_decay: float = 5e-4
    radius: float = 1e-5
    save_every: int = 1

    def validate(self, has_model_threshold: bool) -> None:
        """Reject settings that cannot make decisions."""
        if self.threshold is not None and self.quantile is not None:
            raise ConfigError("give --threshold (fixed) or --quantile (adaptive), not both")
        if self.quantile is not None and not 0 < self.quantile <= 1:
            raise ConfigError(f"--quantile must be in (0, 1], got {self.quantile}")
        for name in ("window", "save_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
        if self.warmup < 0:
            raise ConfigError("--warmup must be >= 0")
        decides = self.threshold is not None or has_model_threshold or (self.quantile is not None and self.warmup)
        if not self.clean and not decides:
            raise ConfigError("this stream cannot tell normal from anomalous images: the model has no threshold. "
                              "Pass --clean (learn from every image), --threshold, or --quantile with --warmup N "
                              "(the first N images are taken as normal)")


class InputsDigest:
    """Identity of the ordered list of images processed so far (a resumed run must see the same prefix): the
    sha256 of their resolved paths joined by newlines, grown one image at a time so that each path is resolved
    once and checkpointing after every image costs O(1)."""

    def __init__(self, paths: list[Path] | tuple[Path, ...] = ()) -> None:
        self._hash = hashlib.sha256()
        self.count = 0
        for path in paths:
            self.add(path)

    def add(self, path: Path) -> None:
        """Append one image (a newline goes before every path but the first)."""
        self._hash.update((b"\n" if self.count else b"") + str(path.resolve()).encode())
        self.count += 1

    def hexdigest(self) -> str:
        """The digest of the paths added so far; adding more afterwards is allowed."""
        return self._hash.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cold_start_artefact(params: Params, extractor: FeatureExtractor, first_image: Path | None = None) -> ModelArtefact:
    """An untrained model from params.yaml: its backbone, the default center, a freshly initialised projector.

    Nothing is learned from data: the center comes from ``center`` (distribution, norm, seed). An aspect-preserving
    ``backbone.resize`` takes the stream's ``first_image``'s aspect ratio.
    """
    if params.center.distribution == "feature_mean":
        raise ConfigError("params key 'center.distribution': a cold start has no features to average; use "
                          "normal, uniform or ones")
    b = params.backbone
    spec_geometry = b.geometry()
    if spec_geometry.fixed:
        geometry = spec_geometry.resolve()
    elif first_image is None:
        raise ConfigError("params key 'backbone.resize' keeps the aspect ratio, so a cold start needs the stream's "
                          "first image to size the model input")
    else:
        width, height = image_size(first_image)
        geometry = spec_geometry.resolve((height, width), f"the stream's first image {first_image} "
                                                                f"({height}x{width}, height x width)")
    spec = for_geometry(extractor, geometry).spec(geometry.size)
    center = make_center(params.center.distribution, params.center.norm, spec.channels, params.center.seed)
    projector = Projector(spec.channels, params.projector.kind, params.projector.bias, seed=params.train.seed,
                          dtype=torch.float64)
    t = params.train
    return ModelArtefact(
        projector=projector.state(), center=center, backbone=backbone_record(b, spec),
        geometry=geometry.record(), feature_shape=(spec.channels, spec.height, spec.width),
        score=score_settings(params.score), threshold=None,
        train={"lr": t.lr, "weight_decay": t.weight_decay, "radius": t.radius, "batch_size": 1, "seed": t.seed},
        provenance={"protocol": "stream cold start", "distribution": params.center.distribution,
                    "norm": float(params.center.norm)})


def cold_start_extractor(params: Params) -> FeatureExtractor:
    """The backbone params.yaml describes."""
    b = params.backbone
    return build_extractor(b.name, b.layers, b.pool, b.weights, b.mean, b.std)


class OnlineLearner:
    """A saved model that keeps learning: one Adam step per accepted image (batch 1, hinge loss)."""

    def __init__(self, artefact: ModelArtefact, settings: StreamSettings, device: str = "cpu",
                 extractor: FeatureExtractor | None = None) -> None:
        self.artefact, self.settings = artefact, settings
        self.detector = Detector.from_artefact(artefact, device, extractor, progress=False, dtype=torch.float64)
        self.projector = self.detector.projector_.requires_grad_(True)
        self.optimizer = Adam(self.projector.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        self.window: deque[float] = deque(artefact.normal_scores[-settings.window:], maxlen=settings.window)
        # The image behind each window score (None: carried over from the model), to score again at save time.
        self.window_paths: deque[str | None] = deque([None] * len(self.window), maxlen=settings.window)
        self.initial = len(self.window)  # scores carried over from the model, oldest first in the window
        self.processed = 0
        self.updates = 0

    def current_threshold(self) -> float | None:
        """The threshold the next image is judged by (None while it cannot be told yet)."""
        s = self.settings
        if s.threshold is not None:
            return s.threshold
        if s.quantile is not None:
            return quantile_threshold(list(self.window), s.quantile).value if self.window else None
        return None if self.artefact.threshold is None else self.artefact.threshold.value

    @property
    def carried(self) -> int:
        """How many scores in the window are the starting model's (the rest are stream images'): every update
        appends one score, pushing the oldest out once the window is full."""
        return max(0, min(self.initial, self.settings.window - self.updates))

    def learn(self, features: torch.Tensor) -> float:
        """One optimizer step on one image's features (1, C, H, W); returns the loss before the step."""
        # clone(): features made under inference mode cannot enter autograd.
        loss = hinge_loss(self.projector(features.clone().to(self.projector.weight.dtype)),
                          self.detector.center_, self.settings.radius)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.updates += 1
        return float(loss.detach())

    def step(self, image: np.ndarray, path: Path | None = None) -> dict[str, Any]:
        """Score one uint8 RGB image (crop, crop, 3), decide, and learn from it if it is taken as normal (``path``:
        where it was read from, so the saved model's threshold can score it again after the updates)."""
        features = self.detector.features(image[None])
        _, scores = self.detector.score_features(features)
        score = float(scores[0])
        threshold = self.current_threshold()
        if self.processed < self.settings.warmup:
            decision = "warmup"
        elif threshold is None:
            decision = "unknown"
        else:
            decision = "anomalous" if score > threshold else "normal"
        learned = self.settings.clean or decision in ("warmup", "normal")
        if learned:
            self.learn(features)
            self.window.append(score)
            self.window_paths.append(None if path is None else str(path))
        self.processed += 1
        return {"score": score, "threshold": threshold, "decision": decision, "learned": learned}

    def state(self) -> dict[str, Any]:
        """What a resumed run needs."""
        return {"projector": self.projector.state(), "optimizer": self.optimizer.state_dict(),
                "window": list(self.window), "window_paths": list(self.window_paths), "processed": self.processed,
                "updates": self.updates}

    def restore(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        with torch.no_grad():
            self.projector.weight.copy_(state["projector"]["weight"])
            if self.projector.bias is not None:
                self.projector.bias.copy_(state["projector"]["bias"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.window = deque(state["window"], maxlen=self.settings.window)
        paths = state.get("window_paths") or [None] * len(self.window)  # states written before paths were kept
        self.window_paths = deque(paths[-len(self.window):] if self.window else [], maxlen=self.settings.window)
        self.processed, self.updates = int(state["processed"]), int(state["updates"])

    def rescored_window(self) -> list[float]:
        """The window's scores by the model as it is now: every image the stream learned from (and can still
        read) scored again after all the updates; a carried-over score, or an image gone since, keeps its own.

        The prequential scores were each taken before that image's update, the early ones by a barely trained
        model: a threshold from them sits far above what the final model gives normal images and flags nothing.
        These are in-sample scores (the model learned from these images), so a quantile of them errs the other
        way: a few unseen normal images are flagged.
        """
        scores = list(self.window)
        readable = [(i, Path(p)) for i, p in enumerate(self.window_paths) if p is not None and Path(p).is_file()]
        geometry = self.detector.geometry
        for start in range(0, len(readable), 16):
            chunk = readable[start:start + 16]
            inputs = np.stack([load_image(path, geometry) for _, path in chunk])
            with torch.no_grad():
                _, fresh = self.detector.score_inputs(inputs)
            for (i, _), score in zip(chunk, fresh, strict=True):
                scores[i] = float(score)
        return scores

    def as_artefact(self) -> ModelArtefact:
        """The model as it is now, as a file for ``polarocc predict``, with the threshold it decides by and a
        true account of it: a fixed ``--threshold`` is rule ``user``; an adaptive ``--quantile`` is rule
        ``stream_quantile`` over the window; otherwise the model's own threshold, unchanged.

        ``normal_scores`` is the window (:meth:`rescored_window`: the images learned from, scored by the final
        model, plus any carried over from the starting model); ``provenance["normal_scores"]`` says so, so a
        later ``predict --quantile`` does not call them training scores.
        """
        s = self.settings
        window = self.rescored_window()
        if s.threshold is not None:
            threshold: Threshold | None = Threshold(float(s.threshold), "user")
        elif s.quantile is not None:
            threshold = stream_quantile_threshold(window, s.quantile, self.carried) if window else None
        else:
            threshold = self.artefact.threshold
        origin = {"source": "stream", "stream": len(window) - self.carried, "carried": self.carried}
        return ModelArtefact(
            projector=self.projector.state(), center=self.artefact.center, backbone=self.artefact.backbone,
            geometry=self.artefact.geometry, feature_shape=self.artefact.feature_shape, score=self.artefact.score,
            threshold=threshold, normal_scores=window, train={**self.artefact.train, "stream_updates": self.updates},
            provenance={**self.artefact.provenance, "stream_images": self.processed, "normal_scores": origin})


def read_state(path: Path) -> dict[str, Any]:
    """A state file's dict, when it reads as a polarocc stream state (plain data carrying the format key)."""
    state = torch_load_plain(path, ModelError, "a polarocc stream state", STATE_FIX)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ModelError(f"{path} is not a polarocc stream state file (it has no {STATE_FORMAT!r} format key); "
                         f"{STATE_FIX}")
    return state


def _damaged(path: Path, detail: str) -> ModelError:
    return ModelError(f"{path} is a damaged polarocc stream state ({detail}); pass --restart to start over")


def _check_state(path: Path, state: dict[str, Any]) -> None:
    """Every key :func:`_resume` reads, with the type it needs."""
    def need(mapping: dict, key: str, test: Callable[[Any], bool], expected: str, where: str = "") -> Any:
        name = f"{where}{key}"
        if key not in mapping:
            raise _damaged(path, f"the key {name!r} is missing")
        if not test(mapping[key]):
            raise _damaged(path, f"{name!r} is a {type(mapping[key]).__name__}, not {expected}")
        return mapping[key]

    def is_count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    identity = need(state, "identity", lambda v: isinstance(v, dict), "a dict")
    need(identity, "model", lambda v: isinstance(v, str), "a string", "identity.")
    need(identity, "settings", lambda v: isinstance(v, dict), "a dict", "identity.")
    need(state, "inputs_digest", lambda v: isinstance(v, str), "a string")
    need(state, "csv_bytes", is_count, "a byte count")
    learner = need(state, "learner", lambda v: isinstance(v, dict), "a dict")
    projector = need(learner, "projector", lambda v: isinstance(v, dict), "a dict", "learner.")
    need(projector, "weight", lambda v: isinstance(v, torch.Tensor), "a tensor", "learner.projector.")
    need(projector, "bias", lambda v: v is None or isinstance(v, torch.Tensor), "a tensor or None",
         "learner.projector.")
    need(learner, "optimizer", lambda v: isinstance(v, dict), "a dict", "learner.")
    need(learner, "window", lambda v: isinstance(v, list | tuple) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in v), "a list of numbers", "learner.")
    if learner.get("window_paths") is not None:
        need(learner, "window_paths", lambda v: isinstance(v, list) and len(v) == len(learner["window"]) and all(
            x is None or isinstance(x, str) for x in v), "a list of paths (or None) as long as the window",
            "learner.")
    for key in ("processed", "updates"):
        need(learner, key, is_count, "a count", "learner.")


def is_stream_csv(path: Path) -> bool:
    """True for an empty file or one whose first line is the stream's header: a CSV ``polarocc stream`` wrote."""
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        first = fh.readline(len(HEADER) + 3)
    return first == b"" or first.rstrip(b"\r\n") == HEADER.encode()


def _not_stream_csv(csv_path: Path) -> UnsafePathError:
    return UnsafePathError(f"--csv: {csv_path} is not a CSV written by polarocc stream (its first line is not "
                           f"{HEADER!r}); polarocc never overwrites or deletes files it did not create. Choose "
                           "another --csv, or remove that file yourself")


def _is_state_file(path: Path) -> bool:
    try:
        read_state(path)
    except ModelError:
        return False
    return path.is_file()


def _check_restartable(csv_path: Path) -> None:
    """--restart deletes only a CSV polarocc stream wrote: checked before anything is touched."""
    if (csv_path.exists() or csv_path.is_symlink()) and not is_stream_csv(csv_path):
        raise _not_stream_csv(csv_path)


def _clear_for_restart(state_path: Path, csv_path: Path) -> None:
    """Delete polarocc's own state file and CSV; a state file it cannot read (truncated, foreign) is not deleted
    but renamed aside to ``<name>.unreadable`` (or ``.unreadable-N``), so nothing that might be someone's is lost."""
    if state_path.exists() or state_path.is_symlink():
        if _is_state_file(state_path):
            state_path.unlink()
        else:
            aside = state_path.with_name(f"{state_path.name}.unreadable")
            n = 1
            while aside.exists():
                aside, n = state_path.with_name(f"{state_path.name}.unreadable-{n}"), n + 1
            os.replace(state_path, aside)
    csv_path.unlink(missing_ok=True)


def _resume(learner: OnlineLearner, state_path: Path, csv_path: Path, images: list[Path], identity: dict,
            inputs: InputsDigest) -> int:
    """Restore ``learner`` from the state file and cut the CSV back to it; feeds the processed images to
    ``inputs``. Returns how many images were processed."""
    state = read_state(state_path)
    _check_state(state_path, state)
    for key, value in identity.items():
        if state["identity"].get(key) != value:
            raise ConfigError(f"cannot resume from {state_path}: its {key} differs from this run's "
                              f"({state['identity'].get(key)!r} != {value!r}); pass the same model and options, "
                              "or --restart")
    processed = int(state["learner"]["processed"])
    if processed <= len(images):
        for path in images[:processed]:
            inputs.add(path)
    if processed > len(images) or inputs.hexdigest() != state["inputs_digest"]:
        raise DataError(f"cannot resume from {state_path}: the first {processed} input images differ from the "
                        "ones already processed (files renamed, removed or reordered); pass --restart to begin again")
    if not csv_path.is_file() or csv_path.stat().st_size < state["csv_bytes"]:
        raise DataError(f"cannot resume: {csv_path} is missing or shorter than the state file records; "
                        "pass --restart to begin again")
    if not is_stream_csv(csv_path):  # the state may be ours while --csv names someone else's file
        raise _not_stream_csv(csv_path)
    try:
        learner.restore(state["learner"])
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # optimizer/projector state of another shape
        reason = " ".join(str(exc).split())[:200]
        raise _damaged(state_path, f"it does not fit this model: {type(exc).__name__}: {reason}") from exc
    with csv_path.open("r+b") as fh:  # drop rows written after the last saved state: they are redone
        fh.truncate(state["csv_bytes"])
    return processed


def _check_kinds(state_path: Path, csv_path: Path) -> None:
    """A folder (or other non-file) where the state file or CSV goes cannot be written or resumed from."""
    for option, path in (("--state", state_path), ("--csv", csv_path)):
        if path.exists() and not path.is_file():
            raise UnsafePathError(f"{option}: {path} exists and is not a file; choose a file path")


def run_stream(learner: OnlineLearner, images: list[Path], csv_path: Path, state_path: Path, model_path: str,
               restart: bool = False, progress: bool = True,
               on_image: Callable[[int], None] | None = None) -> dict[str, int]:
    """Process ``images`` in order with test-then-train, appending a CSV row per image.

    Resumes from ``state_path`` when it exists (unless ``restart``, which first deletes polarocc's own state file
    and CSV; a CSV it did not write is refused, an unreadable state file is renamed aside). ``on_image(index)``
    runs after each image's row and state are written. Returns counts of images processed in this call and in
    total.
    """
    identity = {"model": model_path, "settings": asdict(learner.settings)}
    _check_kinds(state_path, csv_path)
    if restart:
        _check_restartable(csv_path)
        _clear_for_restart(state_path, csv_path)
    start = 0
    inputs = InputsDigest()  # digest of images[:learner.processed], kept up to date image by image
    if state_path.is_file():
        start = _resume(learner, state_path, csv_path, images, identity, inputs)
    elif csv_path.is_file() and csv_path.stat().st_size:
        if not is_stream_csv(csv_path):
            raise _not_stream_csv(csv_path)
        raise DataError(f"{csv_path} exists but there is no state file {state_path} to resume from; pass --restart "
                        "to overwrite it, or choose another --csv")
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    needs_header = not csv_path.is_file() or csv_path.stat().st_size == 0
    geometry = learner.detector.geometry
    with csv_path.open("a", newline="") as fh, tqdm(total=len(images), initial=start, desc="stream", unit="image",
                                                    disable=not progress) as bar:
        writer = csv.writer(fh)
        if needs_header:
            writer.writerow(COLUMNS)

        def checkpoint() -> None:
            fh.flush()
            os.fsync(fh.fileno())
            torch_save_atomic({"format": STATE_FORMAT, "identity": identity, "learner": learner.state(),
                               "inputs_digest": inputs.hexdigest(), "csv_bytes": fh.tell()}, state_path)

        if start == 0:
            checkpoint()
        for index in range(start, len(images)):
            row = learner.step(load_image(images[index], geometry), images[index])
            inputs.add(images[index])
            threshold = "" if row["threshold"] is None else repr(float(row["threshold"]))
            writer.writerow([index, str(images[index]), repr(row["score"]), threshold, row["decision"],
                             row["learned"], learner.updates])
            fh.flush()
            if (index + 1 - start) % learner.settings.save_every == 0 or index + 1 == len(images):
                checkpoint()
            bar.update()
            if on_image is not None:
                on_image(index)
    return {"processed": len(images) - start, "total": learner.processed, "updates": learner.updates}


def save_stream_model(learner: OnlineLearner, path: Path) -> Path:
    """Write the current model as a file :func:`polarocc.detector.artefact.load_artefact` reads."""
    if learner.processed == 0:
        raise ModelError("nothing was learned yet")
    return save_artefact(path, learner.as_artefact())
