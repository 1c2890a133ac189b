"""Overlay figures: the input, its anomaly heat map, and the predicted region outlined on the input."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_erosion

from polarocc.atomic import save_image

HEAT_RANGE = (0.5, 1.5)  # colour scale as multiples of the threshold: the threshold sits mid-scale


def heat_rgb(anomaly_map: np.ndarray, threshold: float) -> np.ndarray:
    """uint8 RGB heat map on a fixed scale around the threshold, so colours compare across images."""
    lo, hi = (threshold * f for f in HEAT_RANGE) if threshold > 0 else (0.0, float(anomaly_map.max()) or 1.0)
    scaled = np.clip((anomaly_map - lo) / max(hi - lo, 1e-12), 0, 1)
    return (matplotlib.colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay_panels(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, score: float) -> Image.Image:
    """Three panels side by side: image | heat map | image with the region above threshold outlined."""
    region = anomaly_map > threshold
    heat = heat_rgb(anomaly_map, threshold)
    blended = image.copy()
    blended[region] = (0.5 * image[region] + 0.5 * heat[region]).astype(np.uint8)
    outline = region & ~binary_erosion(region, iterations=2, border_value=0)
    blended[outline] = (255, 0, 0)
    h, w = anomaly_map.shape
    caption = 22
    canvas = Image.new("RGB", (3 * w, h + caption), "white")
    for i, panel in enumerate((image, heat, blended)):
        canvas.paste(Image.fromarray(panel), (i * w, caption))
    verdict = "ANOMALOUS" if score > threshold else "normal"
    ImageDraw.Draw(canvas).text((4, 5), f"score {score:.4g}  threshold {threshold:.4g}  {verdict}",
                                fill=(200, 0, 0) if score > threshold else (0, 0, 0))
    return canvas


def save_overlay(path: Path, image: np.ndarray, anomaly_map: np.ndarray, threshold: float, score: float) -> Path:
    """Write :func:`overlay_panels` as a PNG, atomically (a crash never leaves half a PNG)."""
    return save_image(path, overlay_panels(image, anomaly_map, threshold, score))
