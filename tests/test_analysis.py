"""Polar diagnostics, cosine similarities and the feasibility table against brute-force versions."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from polarocc.analysis.polar import ANOMALOUS, IGNORED, NORMAL, PolarAccumulator, position_labels
from polarocc.config import parse_params
from polarocc.reports.analysis_tables import feasibility_agreement, feasibility_table
from polarocc.reports.markdown import md_table


def test_cross_cosine_is_the_mean_over_every_pair() -> None:
    rng = np.random.default_rng(0)
    vectors = torch.from_numpy(rng.standard_normal((3, 5, 2, 2)) + 0.3)
    labels = torch.from_numpy(rng.integers(0, 3, (3, 2, 2)).astype(np.int8))
    acc = PolarAccumulator(center=torch.ones(5))
    acc.add(vectors[:2], labels[:2])
    acc.add(vectors[2:], labels[2:])
    flat = vectors.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    kinds = labels.reshape(-1).numpy()
    unit = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    pairs = unit[kinds == NORMAL] @ unit[kinds == ANOMALOUS].T
    assert acc.cross_cosine() == pytest.approx(pairs.mean(), abs=1e-12)
    summary = acc.summary()
    radius = np.linalg.norm(flat[kinds == NORMAL], axis=1)
    assert summary["normal"]["radius"]["q50"] == pytest.approx(np.median(radius), rel=1e-5)
    angle = np.degrees(np.arccos(unit[kinds == ANOMALOUS] @ (np.ones(5) / np.sqrt(5))))
    assert summary["anomalous"]["angle_deg"]["mean"] == pytest.approx(angle.mean(), rel=1e-5)
    assert summary["normal"]["count"] + summary["anomalous"]["count"] == int((kinds != IGNORED).sum())


def test_polar_quantiles_come_from_a_bounded_sample() -> None:
    rng = np.random.default_rng(1)
    vectors = torch.from_numpy(rng.standard_normal((40, 4, 8, 8)) * rng.uniform(0.5, 3, (40, 1, 1, 1)))
    labels = torch.full((40, 8, 8), NORMAL, dtype=torch.int8)
    labels[20:] = ANOMALOUS
    whole, bounded = PolarAccumulator(torch.ones(4)), PolarAccumulator(torch.ones(4), sample_limit=300)
    for start in range(0, 40, 8):
        whole.add(vectors[start:start + 8], labels[start:start + 8])
        bounded.add(vectors[start:start + 8], labels[start:start + 8])
    assert len(bounded.sample[NORMAL].rows) == 300 < 20 * 64 == len(whole.sample[NORMAL].rows)
    full, sampled = whole.summary(), bounded.summary()
    # Counts and the cosine use every vector; quantiles of a 300-vector sample land near the full ones.
    assert sampled["cosine_normal_anomalous"] == full["cosine_normal_anomalous"]
    assert sampled["normal"]["count"] == full["normal"]["count"] == 1280
    for kind in ("normal", "anomalous"):
        assert sampled[kind]["radius"]["q50"] == pytest.approx(full[kind]["radius"]["q50"], rel=0.1)
        assert sampled[kind]["angle_deg"]["q50"] == pytest.approx(full[kind]["angle_deg"]["q50"], rel=0.1)
        assert sampled[kind]["radius"] != full[kind]["radius"]


def test_polar_summary_without_anomalous_vectors_has_empty_entries() -> None:
    accumulator = PolarAccumulator(torch.ones(4))
    labels = torch.full((2, 8, 8), NORMAL, dtype=torch.int8)
    labels[1, 0, 0] = IGNORED  # a defect too thin to cover half of any feature cell
    accumulator.add(torch.randn(2, 4, 8, 8), labels)
    summary = accumulator.summary()
    assert summary["cosine_normal_anomalous"] is None
    assert summary["normal"]["count"] == 127 and summary["normal"]["radius"]["q50"] > 0
    assert summary["anomalous"]["count"] == 0
    assert summary["anomalous"]["radius"]["q50"] is None and summary["anomalous"]["angle_deg"]["mean"] is None


def test_position_labels() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[1, :4, :4] = True  # the top-left quarter of image 1 is defective
    labels = position_labels(masks, np.array([0, 1]), 2, 2)
    assert (labels[0] == NORMAL).all()
    assert labels[1, 0, 0] == ANOMALOUS and (labels[1].flatten()[1:] == IGNORED).all()


def test_feasibility_table(params_dict: dict) -> None:
    params_dict["sweep"] = {"norms": [1, 2, 4, 8], "distributions": ["normal"]}
    params = parse_params(params_dict)
    auroc = {"a": [0.90, 0.905, 0.899, 0.80], "b": [0.70, 0.80, 0.795, 0.60], "c": [0.9, 0.9, 0.9, 0.9],
             "d": [0.95, 0.90, 0.80, 0.70]}
    rows = [{"method": "projector", "protocol": "B", "dataset": "t", "category": cat, "distribution": "normal",
             "norm": float(n), "image_auroc": a}
            for cat, values in auroc.items() for n, a in zip([1, 2, 4, 8], values, strict=True)]
    cosines = {"t": {cat: {"cosine_normal_anomalous": 0.1 * i, "cosine_normal_normal": 0.2 * i}
                     for i, cat in enumerate(auroc, start=1)}}
    table = feasibility_table(pl.DataFrame(rows), cosines, params)
    by_cat = {r["category"]: r for r in table.iter_rows(named=True)}
    assert by_cat["a"]["feasible_norms"] == "1, 2, 4" and by_cat["a"]["tolerated_norm"] == 4
    assert by_cat["b"]["feasible_norms"] == "2, 4" and by_cat["b"]["tolerated_norm"] == 4
    assert by_cat["c"]["tolerated_norm"] == 8 and by_cat["d"]["tolerated_norm"] == 1
    # Leave-one-out: category d's label-free norm comes from a line through a, b and c only.
    x, y = np.array([0.2, 0.4, 0.6]), np.log2([4, 4, 8])
    slope, intercept = np.polyfit(x, y, 1)
    predicted = 2 ** (intercept + slope * 0.8)
    assert by_cat["d"]["label_free_norm"] == max(n for n in (1, 2, 4, 8) if n <= predicted + 1e-9)
    agreement = feasibility_agreement(table)
    assert agreement["dataset"].to_list() == ["t", "all"]
    assert agreement["label_free_in_feasible"][0] == pytest.approx(table["label_free_in_feasible"].mean())


def test_md_table() -> None:
    text = md_table(pl.DataFrame({"a": ["x", None], "b": [0.123456, float("nan")]}))
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.1235 |", "| - | - |"]


def test_tsne_sample_reads_the_chosen_positions_shard_by_shard(extracted_project) -> None:
    from polarocc import layout
    from polarocc.analysis.polar import store_position_labels
    from polarocc.config import load_params
    from polarocc.features.store import FeatureStore
    from polarocc.pipeline.analyze import _tsne_sample

    params = load_params(extracted_project / "params.yaml")
    store = FeatureStore(layout.feature_store(params, "mine", "brick"))
    vectors, anomalous = _tsne_sample(store, 40, seed=3)
    whole = torch.from_numpy(store.features("test")[:].astype(np.float32))  # several shards of 4 images
    flat = whole.permute(0, 2, 3, 1).reshape(-1, whole.shape[1]).numpy()
    labels = store_position_labels(store).reshape(-1).numpy()
    assert vectors.shape == (40, store.channels, 1, 1) and anomalous.sum() == 20
    # Every sampled vector is a test position of the stated kind, each drawn once.
    rows = [int(np.flatnonzero((flat == v).all(1))[0]) for v in vectors[:, :, 0, 0].numpy()]
    assert len(set(rows)) == 40 and rows == sorted(rows)
    assert (np.where(labels[rows] == ANOMALOUS, 1, 0) == anomalous).all()
    assert set(labels[rows]) <= {NORMAL, ANOMALOUS}
