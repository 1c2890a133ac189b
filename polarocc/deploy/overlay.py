"""Overlay figures: where a model finds the defect, drawn with PIL and numpy (a few ms per image).

One row of titled panels::

    image | anomaly map + colour bar | ground truth (only with a mask) | prediction

* **anomaly map**: the map in the ``inferno`` colours of :func:`heat_scale` (dark = a typical normal pixel,
  bright = a pixel as high as only the rarest normal pixels, or higher), with a colour bar on the map's own
  scale (the score scale: an image's score is the peak of its smoothed map) where the decision threshold is
  marked in red.
* **ground truth**: the image with the mask's defective pixels tinted and outlined in green.
* **prediction**: the image with the pixels above the threshold tinted in the heat colours and outlined in red,
  titled with the verdict, the score and the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import binary_erosion

from polarocc.atomic import save_image

COLOURMAP = "inferno"
FALLBACK_LOW_CAP = 0.5  # without map_scale, low is at most this fraction of high (see heat_scale)
GAP = 4  # white pixels between panels
BAR_STRIP = 10  # colour bar strip width
TICK = 3
PREDICTION_RGB = (220, 0, 0)  # the predicted region's outline, the threshold on the bar and an anomalous verdict
TRUTH_RGB = (0, 200, 0)  # the ground-truth outline and tint
TEXT_RGB = (0, 0, 0)


@dataclass(frozen=True)
class HeatScale:
    """The colour scale of a heat panel: map values at or below ``low`` are darkest, at or above ``high``
    brightest. ``rule`` says where the two came from (``normal maps``, ``normal scores`` or ``own range``)."""

    low: float
    high: float
    rule: str


def heat_scale(anomaly_map: np.ndarray, map_scale: Sequence[float] | None = None,
               normal_scores: Sequence[float] = ()) -> HeatScale:
    """The heat colour scale for ``anomaly_map``, from the first of these that the model provides:

    1. ``map_scale`` (model files record it as ``ModelArtefact.map_scale``): percentiles 50 and 99.9 of the
       pixels of normal images' anomaly maps, so a typical normal pixel is dark and only a defect (or the
       rarest normal pixels) is bright, on the same scale for every image of the model.
    2. Older model files without it: ``high`` = the median of the model's ``normal_scores``. An image score is
       the peak of its smoothed map, so this is the typical normal image's highest pixel, the same quantity
       as the 99.9th percentile of normal pixels in spirit (on the pipeline's texture models the two differ by
       under 4%), and it is the same for every image of the model. Normal scores say nothing about the
       background level, so ``low`` = the map's own median (most pixels of an image are normal), capped at
       half of ``high`` so the scale keeps its span on an image that is anomalous all over.
    3. No normal scores either (a model saved without them): the map's own range, median to maximum. Every
       map then fills the scale, so a normal image looks as hot as a defective one: read the colour bar.
    """
    if map_scale is not None:
        low, high = (float(v) for v in map_scale)
        rule = "normal maps"
    else:
        scores = np.asarray(normal_scores, dtype=np.float64)
        scores = scores[np.isfinite(scores)]
        finite = np.asarray(anomaly_map, dtype=np.float64)
        finite = finite[np.isfinite(finite)]
        median = float(np.median(finite)) if finite.size else 0.0
        if scores.size:
            high = float(np.median(scores))
            low = min(median, FALLBACK_LOW_CAP * high)
            rule = "normal scores"
        else:
            low, high = median, float(finite.max()) if finite.size else 1.0
            rule = "own range"
    if not high > low:  # a constant map or a degenerate scale: keep a span so the division is defined
        high = low + max(abs(low) * 1e-6, 1e-12)
    return HeatScale(low, high, rule)


@lru_cache(maxsize=1)
def _palette() -> np.ndarray:
    """The colour map as a (256, 3) uint8 lookup table."""
    return (matplotlib.colormaps[COLOURMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def heat_rgb(values: np.ndarray, scale: HeatScale) -> np.ndarray:
    """uint8 RGB colours of map ``values`` on ``scale`` (clipped at its ends; NaN is drawn as the low end)."""
    unit = (np.asarray(values, dtype=np.float64) - scale.low) / (scale.high - scale.low)
    index = np.nan_to_num(np.clip(unit, 0.0, 1.0) * 255.0 + 0.5, nan=0.0).astype(np.uint8)
    return _palette()[index]


@lru_cache(maxsize=1)
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(text: str) -> tuple[int, int]:
    left, _, right, bottom = _font().getbbox(text)
    return int(right - min(left, 0)), int(bottom)


def _line_height() -> int:
    return _text_size("Ag")[1] + 2


def _wrap(text: str, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels where spaces allow (a longer word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}".strip()
            if line and _text_size(candidate)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def _outline(region: np.ndarray) -> np.ndarray:
    return region & ~binary_erosion(region, iterations=2, border_value=0)


def _tinted(image: np.ndarray, region: np.ndarray, colour: np.ndarray | tuple[int, int, int],
            outline: tuple[int, int, int]) -> np.ndarray:
    """``image`` with ``region`` blended half and half with ``colour`` and its border drawn in ``outline``."""
    out = image.copy()
    tint = colour[region] if isinstance(colour, np.ndarray) else np.asarray(colour, dtype=np.float64)
    out[region] = (0.5 * image[region] + 0.5 * tint).astype(np.uint8)
    out[_outline(region)] = outline
    return out


def colour_bar(scale: HeatScale, threshold: float, height: int) -> Image.Image:
    """A vertical colour bar ``height`` pixels tall: the heat colours against map values, ``low`` and ``high``
    labelled and the ``threshold`` drawn across it in red. The bar's axis reaches past the colour scale to take
    in a threshold within one span of it (colours saturate there); a threshold further off is marked by a
    triangle at the end it lies beyond."""
    lo, hi = scale.low, scale.high
    span = hi - lo
    a0, a1 = lo, hi
    finite = math.isfinite(threshold)
    if finite:
        a0, a1 = min(lo, max(threshold, lo - span)), max(hi, min(threshold, hi + span))
    line = _line_height()
    top = line // 2 + 1
    rows = max(height - 2 * top, 2)
    values = a1 - np.arange(rows) / (rows - 1) * (a1 - a0)
    strip = np.repeat(heat_rgb(values[:, None], scale), BAR_STRIP, axis=1)

    def y_of(value: float) -> int:
        return top + round((a1 - min(max(value, a0), a1)) / (a1 - a0) * (rows - 1))

    marks = ([(threshold, f"thr {threshold:.4g}", True)] if finite else []) + [
        (hi, f"{hi:.4g}", False), (lo, f"{lo:.4g}", False)]
    width = BAR_STRIP + TICK + 2 + max(_text_size(text)[0] for _, text, _ in marks) + 1
    panel = Image.new("RGB", (width, height), "white")
    panel.paste(Image.fromarray(strip), (0, top))
    draw = ImageDraw.Draw(panel)
    taken: list[tuple[int, int]] = []
    for value, text, is_threshold in marks:  # the threshold first: the low/high labels make way for it
        y = y_of(value)
        colour = PREDICTION_RGB if is_threshold else TEXT_RGB
        if is_threshold:
            draw.rectangle((0, y - 1, BAR_STRIP + TICK, y), fill=colour)
            if value > a1 or value < a0:  # off the axis: a triangle pointing beyond the bar's end
                tip = 0 if value > a1 else height - 1
                base = top - 1 if value > a1 else top + rows
                draw.polygon([(BAR_STRIP // 2, tip), (1, base), (BAR_STRIP - 2, base)], fill=colour)
        else:
            draw.line((BAR_STRIP, y, BAR_STRIP + TICK, y), fill=colour)
        y_text = min(max(y - line // 2, 0), height - line)
        if all(y_text + line <= a or y_text >= b for a, b in taken):
            draw.text((BAR_STRIP + TICK + 2, y_text), text, fill=colour, font=_font())
            taken.append((y_text, y_text + line))
    return panel


def overlay_panels(image: np.ndarray, anomaly_map: np.ndarray, threshold: float, score: float, *,
                   map_scale: Sequence[float] | None = None, normal_scores: Sequence[float] = (),
                   mask: np.ndarray | None = None) -> Image.Image:
    """The overlay figure of one image (see the module docstring): ``image`` uint8 RGB (H, W, 3) or grey
    (H, W), its ``anomaly_map`` (H, W), the decision ``threshold`` and the image's ``score``; the heat colours
    from ``map_scale`` or, without it, ``normal_scores`` (:func:`heat_scale`); a ground-truth panel exactly
    when a ``mask`` (H, W, non-zero = defective) is given."""
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.ndim != 2:
        raise ValueError(f"an anomaly map must be 2-D (H, W), not of shape {anomaly_map.shape}")
    h, w = anomaly_map.shape
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.shape != (h, w, 3):
        raise ValueError(f"the image is {image.shape} but its anomaly map is {anomaly_map.shape}: give the image "
                         "at the map's size (the model's crop)")
    scale = heat_scale(anomaly_map, map_scale, normal_scores)
    heat = heat_rgb(anomaly_map, scale)
    anomalous = score > threshold
    verdict = "ANOMALOUS" if anomalous else "normal"
    panels: list[tuple[str, Image.Image, tuple[int, int, int]]] = [
        ("image", Image.fromarray(image), TEXT_RGB),
        ("anomaly map", Image.fromarray(heat), TEXT_RGB),
        ("", colour_bar(scale, threshold, h), TEXT_RGB)]
    if mask is not None:
        truth = np.asarray(mask) > 0
        if truth.shape != (h, w):
            raise ValueError(f"the mask is {truth.shape} but the anomaly map is {anomaly_map.shape}")
        title = "ground truth" if truth.any() else "ground truth: no defect"
        panels.append((title, Image.fromarray(_tinted(image, truth, TRUTH_RGB, TRUTH_RGB)), TEXT_RGB))
    prediction = _tinted(image, anomaly_map > threshold, heat, PREDICTION_RGB)
    relation = ">" if anomalous else "<="
    panels.append((f"prediction: {verdict}\nscore {score:.4g} {relation} threshold {threshold:.4g}",
                   Image.fromarray(prediction), PREDICTION_RGB if anomalous else TEXT_RGB))

    titles = [_wrap(title, panel.width) if title else [] for title, panel, _ in panels]
    line = _line_height()
    header = 3 + line * max(len(t) for t in titles)
    width = sum(panel.width for _, panel, _ in panels) + GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, header + h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for lines, (_, panel, colour) in zip(titles, panels, strict=True):
        canvas.paste(panel, (x, header))
        for i, text in enumerate(lines):
            draw.text((x + max((panel.width - _text_size(text)[0]) // 2, 0), 2 + i * line), text, fill=colour,
                      font=_font())
        x += panel.width + GAP
    return canvas


def save_overlay(path: Path, image: np.ndarray, anomaly_map: np.ndarray, threshold: float, score: float, *,
                 map_scale: Sequence[float] | None = None, normal_scores: Sequence[float] = (),
                 mask: np.ndarray | None = None) -> Path:
    """Write :func:`overlay_panels` as a PNG, atomically (a crash never leaves half a PNG)."""
    return save_image(path, overlay_panels(image, anomaly_map, threshold, score, map_scale=map_scale,
                                           normal_scores=normal_scores, mask=mask))
