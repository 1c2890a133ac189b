"""A fitted detector measured on a labelled test folder (``polarocc fit --test``): image ROC AUC, and pixel ROC
AUC and AUPRO where every defective image has a mask, at each image's own resolution."""

from __future__ import annotations

import numpy as np

from polarocc.data.images import open_image
from polarocc.data.samples import Sample
from polarocc.detector.detector import Detector
from polarocc.scoring.metrics import f1_max, image_auroc
from polarocc.scoring.pixel_metrics import pixel_metrics_for

METRICS_MEMORY_MB = 2048  # pixel metrics stay exact while every map fits this, else binned (bounded memory)


def _mask(sample: Sample, shape: tuple[int, ...]) -> np.ndarray:
    if sample.mask_path is None:
        return np.zeros(shape, dtype=bool)
    return np.asarray(open_image(sample.mask_path).convert("L")) > 0


def evaluate(detector: Detector, samples: list[Sample]) -> dict[str, float | int | None]:
    """Metrics of ``detector`` on labelled ``samples`` (label 1 = defective; checked beforehand with
    :func:`polarocc.data.mvtec.check_files`) and how many of each kind its threshold flags. Pixel metrics are None
    unless every defective image has a mask; images may differ in size."""
    labels = np.array([s.label for s in samples])
    pixel_level = all(s.mask_path is not None for s in samples if s.label == 1)
    scores, maps = detector.score_and_maps([s.path for s in samples], maps=pixel_level)
    flagged = scores > detector.threshold
    result: dict[str, float | int | None] = {
        "images": len(samples), "defective": int(labels.sum()), "image_auroc": image_auroc(labels, scores),
        "image_f1_max": f1_max(labels, scores), "pixel_auroc": None, "aupro": None,
        "flagged_good": int(flagged[labels == 0].sum()), "flagged_defective": int(flagged[labels == 1].sum()),
        "threshold": detector.threshold}
    if pixel_level:
        [pixel] = pixel_metrics_for(sum(m.size for m in maps), 1, METRICS_MEMORY_MB)
        for sample, anomaly_map in zip(samples, maps, strict=True):
            pixel.add(anomaly_map[None], _mask(sample, anomaly_map.shape)[None])
        metrics = pixel.result()
        result.update(pixel_auroc=metrics["pixel_auroc"], aupro=metrics["aupro"])
    return result
