"""Score new images with a saved model: a CSV of scores and decisions, anomaly maps and overlay figures."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import polars as pl
from tqdm import tqdm

from polarocc.atomic import atomic_file, save_npy
from polarocc.data.inputs import output_names
from polarocc.data.mvtec import check_files
from polarocc.data.samples import Sample
from polarocc.deploy.overlay import save_overlay
from polarocc.detector.artefact import ModelArtefact, Threshold
from polarocc.detector.detector import Detector
from polarocc.detector.images import as_images, batches, map_to_image
from polarocc.detector.threshold import (
    holdout_quantile_threshold,
    quantile_threshold,
    radius_threshold,
    stream_quantile_threshold,
    user_threshold,
)
from polarocc.errors import ConfigError
from polarocc.ownership import check_replaceable, replace_folder

COLUMNS = ["path", "score", "threshold", "normalized_score", "anomalous", "map", "overlay"]


def choose_threshold(artefact: ModelArtefact, value: float | None = None, quantile: float | None = None,
                     radius: bool = False) -> Threshold:
    """The decision threshold: given ``value``, a ``quantile`` of the model's normal scores (its held-out or
    training images', or a stream model's window), the paper's radius rule, or (none given) the threshold saved
    with the model."""
    if sum(x is not None and x is not False for x in (value, quantile, radius)) > 1:
        raise ConfigError("give at most one of --threshold, --quantile and --radius-threshold")
    if value is not None:
        return user_threshold(value)
    if quantile is not None:
        origin = artefact.normal_scores_origin()
        if origin is not None and origin.get("source") == "stream":  # a stream model's window, not training scores
            return stream_quantile_threshold(artefact.normal_scores, quantile, int(origin.get("carried", 0)))
        if origin is not None and origin.get("source") == "holdout":  # images held out of the model's training
            return holdout_quantile_threshold(artefact.normal_scores, quantile)
        return quantile_threshold(artefact.normal_scores, quantile)
    if radius:
        return radius_threshold(float(artefact.train.get("radius", 1e-5)), bool(artefact.score["squared"]))
    if artefact.threshold is None:
        raise ConfigError("this model has no saved threshold (no normal training scores); give --threshold")
    return artefact.threshold


def normalized(score: float, threshold: float) -> float:
    """score / threshold: above 1 is anomalous, whatever the model's score scale (inf for a zero threshold)."""
    return score / threshold if threshold > 0 else float("inf")


def predict(detector: Detector, images: list[Path], out: Path, threshold: Threshold, batch_size: int = 16,
            write_maps: bool = True, progress: bool = True) -> pl.DataFrame:
    """Score ``images`` into the folder ``out``: ``scores.csv``, and per image ``maps/<name>.npy`` (the float32
    anomaly map at the image's own height and width) and ``overlays/<name>.png`` (on the image as it is).

    The whole folder is built beside ``out`` and replaces it only when complete, so a failure leaves the
    previous output as it was and a rerun leaves no stale files. ``out`` must be absent, empty or an earlier
    polarocc output (it carries polarocc's marker); anything else is refused before any scoring.
    """
    out = Path(out)
    check_replaceable(out, "--out", "predict")
    check_files([Sample(p, 0) for p in images], progress)  # a bad file stops the run by name, before scoring
    names = output_names(images)
    model = detector.artefact  # its map_scale (or, in older files, normal scores) sets the overlays' colours

    def build(folder: Path) -> None:
        rows: list[list[object]] = []
        with tqdm(total=len(images), desc="predict", unit="image", disable=not progress) as bar:
            geometry = detector.geometry
            for start, (chunk, inputs, originals) in zip(range(0, len(images), batch_size),
                                                          batches(as_images(images), geometry, batch_size),
                                                          strict=True):
                paths, stems = images[start:start + batch_size], names[start:start + batch_size]
                input_maps, scores = detector.score_inputs(inputs)
                for path, stem, image, input_map, score in zip(paths, stems, originals, input_maps, scores,
                                                               strict=True):
                    map_file = overlay_file = ""
                    if write_maps:
                        anomaly_map = map_to_image(input_map, geometry, image.shape[:2])
                        map_file, overlay_file = f"maps/{stem}.npy", f"overlays/{stem}.png"
                        save_npy(folder / map_file, anomaly_map.astype(np.float32))
                        save_overlay(folder / overlay_file, image, anomaly_map, threshold.value, float(score),
                                     map_scale=model.map_scale, normal_scores=model.normal_scores)
                    rows.append([str(path), repr(float(score)), repr(threshold.value),
                                 repr(normalized(float(score), threshold.value)), bool(score > threshold.value),
                                 map_file, overlay_file])
                bar.update(len(chunk))
        with atomic_file(folder / "scores.csv", "w") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows(rows)

    replace_folder(out, "--out", "predict", build)
    return pl.read_csv(out / "scores.csv", schema_overrides={"map": pl.String, "overlay": pl.String})
