"""ONNX export: one graph from a uint8 image batch to image scores and anomaly maps, runnable with onnxruntime alone.

The graph is traced from the same torch code that scores images here (normalisation, backbone, multi-scale
aggregation, projector, distance, upsampling, blur and reduction of :mod:`polarocc.scoring.maps`), so the two
paths compute the same function; only the float32 kernels' rounding differs. A tiled model's graph holds every
tile's forward and the stitching. Input ``images``: uint8 RGB (N, height, width, 3) at the model input's size,
resized and center-cropped as the model records (``resize``, ``crop``, ``input_height``, ``input_width`` in the
metadata). Outputs ``score`` (N,) and ``anomaly_map`` (N, height, width), float32.
"""

from __future__ import annotations

import inspect
import io
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from polarocc.atomic import write_bytes
from polarocc.config import REDUCTIONS
from polarocc.errors import ConfigError, UnsafePathError
from polarocc.models.projector import Projector
from polarocc.scoring.maps import distance_maps, gaussian_blur, reduce_maps, upsample

if TYPE_CHECKING:
    from polarocc.detector.artefact import ModelArtefact
    from polarocc.geometry import Geometry
    from polarocc.models.backbone import FeatureExtractor
    from polarocc.models.tiling import TiledExtractor

PRODUCER = "polarocc"
INPUT = "images"
OUTPUTS = ("score", "anomaly_map")
INSTALL_HINT = 'ONNX export needs the onnx package: pip install "polarocc[onnx]"'
# Features are rounded through the model's feature dtype before projection, as the torch path does.
FEATURE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _onnx() -> Any:
    """The ``onnx`` module, or a one-line ConfigError naming the extra that provides it."""
    try:
        import onnx
    except ImportError as exc:
        raise ConfigError(INSTALL_HINT) from exc
    return onnx


class OnnxScorer(nn.Module):
    """uint8 model inputs (N, height, width, 3) -> (scores (N,), anomaly maps (N, height, width)), as
    :class:`Detector`."""

    def __init__(self, extractor: FeatureExtractor | TiledExtractor, projector: Projector, center: torch.Tensor,
                 input_size: tuple[int, int], score: Mapping[str, Any]) -> None:
        super().__init__()
        self.extractor = extractor.eval()
        device = extractor.mean.device
        # A float32 copy: the caller's projector (float64 while a stream trains it) stays as it is.
        self.projector = Projector.from_state(projector.state(), dtype=torch.float32).to(device).eval()
        self.register_buffer("center", center.detach().to(device, torch.float32).flatten().clone())
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.sigma = float(score["sigma"])
        self.reduction = str(score["reduction"])
        self.topk = int(score["topk"])
        self.squared = bool(score["squared"])
        self.feature_dtype = FEATURE_DTYPES[str(score.get("feature_dtype", "float32"))]
        # The exporter restores the module's mode after tracing: a scorer left in training mode would put the
        # shared backbone's batch norms into training mode, and the caller's next torch scores would drift.
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The extractor's forward runs under inference_mode, which the tracer cannot record.
        features = self.extractor.compute(images, self.feature_dtype).float()
        maps = gaussian_blur(upsample(distance_maps(self.projector, self.center, features, self.squared),
                                      self.input_size), self.sigma)
        return reduce_maps(maps, self.reduction, self.topk), maps


def check_onnx_target(path: Path | str) -> None:
    """Fail unless an ONNX file may be written at ``path``: nothing is there yet, or an ONNX file polarocc wrote
    is (polarocc never overwrites files it did not create). Call it before the work that makes the file."""
    onnx = _onnx()  # first, so a missing package is reported before any work
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_file():
        try:
            producer = onnx.load(str(path), load_external_data=False).producer_name
        except Exception:  # any unreadable or foreign file is refused alike
            producer = None
        if producer == PRODUCER:
            return
    what = "a folder" if path.is_dir() else "a file that polarocc did not export"
    raise UnsafePathError(f"{path} exists and is {what}; polarocc never overwrites files it did not create. "
                          "Choose another path, or remove it yourself")


def _check_score(score: Mapping[str, Any]) -> None:
    missing = [k for k in ("sigma", "reduction", "topk", "squared") if k not in score]
    if missing:
        raise ConfigError(f"score settings lack {', '.join(missing)}: cannot export the model to ONNX")
    if score["reduction"] not in REDUCTIONS:
        raise ConfigError(f"unknown score reduction {score['reduction']!r}; choose one of {', '.join(REDUCTIONS)}")
    if str(score.get("feature_dtype", "float32")) not in FEATURE_DTYPES:
        raise ConfigError(f"unknown feature dtype {score['feature_dtype']!r}; choose one of "
                          f"{', '.join(FEATURE_DTYPES)}")


def export_onnx(extractor: FeatureExtractor | TiledExtractor, projector: Projector, center: torch.Tensor,
                geometry: Geometry, score: Mapping[str, Any], path: Path | str, opset: int = 17, *,
                threshold: float | None = None, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the whole scorer as one ONNX graph with a dynamic batch axis, atomically; returns ``path``.

    ``score`` holds sigma, reduction, topk, squared and optionally feature_dtype (a model file's ``score``). The
    metadata_props hold the geometry (``resize``, ``crop``, ``tiles`` as JSON; ``input_height``, ``input_width``)
    and, where given, ``threshold`` and ``metadata``'s entries (as strings).
    """
    onnx = _onnx()
    check_onnx_target(path)
    _check_score(score)
    height, width = geometry.size
    scorer = OnnxScorer(extractor, projector, center, geometry.size, score)
    # Two different images: a batch of one lets the tracer fold away the batch axis in places.
    device = scorer.center.device
    example = torch.arange(2 * height * width * 3, device=device).remainder(251).to(torch.uint8).view(
        2, height, width, 3)
    buffer = io.BytesIO()
    # torch >= 2.5 defaults to (or offers) the dynamo exporter, which needs onnxscript; torch < 2.5 has only the
    # TorchScript one and no ``dynamo`` argument.
    legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    with torch.no_grad(), warnings.catch_warnings():
        # Expected, so not shown: the TorchScript exporter (no onnxscript needed) is deprecated, the tracer turns
        # comparisons of spatial shapes into constants (right: the crop is fixed; none involves the batch axis),
        # and a few strided slices are not constant-folded.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding")
        torch.onnx.export(scorer, (example,), buffer, **legacy, export_params=True, opset_version=int(opset),
                          do_constant_folding=True, input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUTS[0]: {0: "batch"}, OUTPUTS[1]: {0: "batch"}})
    model = onnx.load_from_string(buffer.getvalue())
    import polarocc

    model.producer_name, model.producer_version = PRODUCER, str(polarocc.__version__)
    model.doc_string = (f"polarocc anomaly scorer: uint8 RGB images (N, {height}, {width}, 3), resized to `resize` "
                        "(height, width) and center-cropped to `crop` (none when null) -> score (N,), anomaly_map "
                        f"(N, {height}, {width})")
    record = geometry.record()
    props: dict[str, str] = {"resize": json.dumps(record["resize"]), "crop": json.dumps(record["crop"]),
                             "input_height": str(height), "input_width": str(width),
                             "input_layout": "NHWC uint8 RGB", **{f"score_{k}": str(v) for k, v in score.items()}}
    if "tiles" in record:
        props["tiles"] = json.dumps(record["tiles"])
    if threshold is not None:
        props["threshold"] = repr(float(threshold))
    props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return write_bytes(path, model.SerializeToString())


def export_artefact_onnx(artefact: ModelArtefact, path: Path | str, opset: int = 17,
                         extractor: FeatureExtractor | None = None) -> Path:
    """Export a saved model to ONNX at ``path``, on the CPU (its backbone is built here unless ``extractor`` is
    given; a given one is moved to the CPU, as :class:`Detector` does)."""
    from polarocc.detector.detector import Detector

    check_onnx_target(path)  # before the backbone is built
    # The detector builds (or checks) the backbone the model records and holds its float32 projector and center.
    detector = Detector.from_artefact(artefact, "cpu", extractor, progress=False)
    threshold = artefact.threshold
    extra = {"backbone": artefact.backbone["name"], "layers": ",".join(map(str, artefact.backbone["layers"]))}
    if threshold is not None:
        extra["threshold_rule"] = threshold.describe()
    return export_onnx(detector.extractor, detector.projector_, detector.center_, detector.geometry, artefact.score,
                       path, opset, threshold=None if threshold is None else threshold.value, metadata=extra)
