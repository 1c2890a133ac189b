"""Cosine similarity of pre-trained features: normal against anomalous (needs labels) and, as the
label-free estimate, normal against normal across two halves of the training images."""

from __future__ import annotations

import numpy as np
import torch

from polarocc.analysis.polar import ANOMALOUS, NORMAL, PolarAccumulator, store_position_labels
from polarocc.features.store import FeatureStore


def halves(n: int, seed: int) -> np.ndarray:
    """A seeded split of ``n`` training images into two halves: half index (0/1) per image."""
    order = np.random.default_rng(seed).permutation(n)
    side = np.zeros(n, dtype=np.int64)
    side[order[n // 2:]] = 1
    return side


def normal_split_cosine(batches, sides: np.ndarray) -> float:
    """Mean pairwise cosine between the feature vectors of the two halves (label-free)."""
    acc = PolarAccumulator()
    for indices, features in batches:
        labels = np.where(sides[indices] == 0, NORMAL, ANOMALOUS)[:, None, None]
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))
        acc.add(x, torch.from_numpy(np.broadcast_to(labels, (len(x), *x.shape[2:])).copy()))
    return acc.cross_cosine()


def store_cosines(store: FeatureStore, seed: int) -> dict[str, float]:
    """Pre-trained cosines of a Protocol B category: normal vs anomalous test positions (labelled) and
    between the two halves of the normal training images (label-free)."""
    labels = store_position_labels(store)
    acc = PolarAccumulator()
    for indices, features in store.batches("test"):
        acc.add(torch.from_numpy(np.asarray(features, dtype=np.float32)), labels[indices])
    sides = halves(store.features("train").shape[0], seed)
    return {"cosine_normal_anomalous": acc.cross_cosine(),
            "cosine_normal_normal": normal_split_cosine(store.batches("train"), sides)}


def vector_cosines(train: np.ndarray, test: np.ndarray, anomalous: np.ndarray, seed: int) -> dict[str, float]:
    """The same for one vector per image (Protocol A): ``train`` (n, C, 1, 1) of the normal class, ``test``
    rows with 0/1 ``anomalous`` flags."""
    acc = PolarAccumulator()
    acc.add(torch.from_numpy(test), torch.from_numpy(np.where(anomalous == 1, ANOMALOUS, NORMAL)[:, None, None]))
    sides = halves(len(train), seed)
    return {"cosine_normal_anomalous": acc.cross_cosine(),
            "cosine_normal_normal": normal_split_cosine([(np.arange(len(train)), train)], sides)}
