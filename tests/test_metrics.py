"""Metrics and map post-processing on hand-made cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from sklearn.metrics import roc_auc_score

from polarocc.errors import DataError
from polarocc.models.projector import Projector
from polarocc.scoring.maps import distance_maps, gaussian_blur, reduce_maps, score_batch
from polarocc.scoring.metrics import aupro, f1_max, image_auroc, pixel_auroc, pixel_auroc_and_f1_max, rank_auroc


def test_image_auroc_hand_cases() -> None:
    assert image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc([0, 1], [0.5, 0.5]) == 0.5
    # one of four (normal, anomalous) pairs is misordered
    assert image_auroc([0, 0, 1, 1], [0.1, 0.6, 0.5, 0.9]) == 0.75


def test_pixel_auroc_hand_case() -> None:
    masks = np.zeros((2, 2, 2), dtype=bool)
    masks[1, 0, 0] = True
    maps = np.zeros((2, 2, 2), dtype=np.float32)
    maps[1, 0, 0] = 5.0
    assert pixel_auroc(masks, maps) == 1.0
    maps[0, 1, 1] = 9.0  # one normal pixel above the defect: 1 of 7 pairs wrong
    assert pixel_auroc(masks, maps) == pytest.approx(6 / 7)


@pytest.mark.parametrize("seed", range(5))
def test_rank_auroc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.random(5000) + 0.3 * labels, 2)  # many ties
    assert rank_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auroc(labels.astype(int), scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_refuses_non_finite_scores_and_length_mismatch() -> None:
    with pytest.raises(FloatingPointError, match="NaN"):
        image_auroc([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"0 \(normal\) or 1 \(anomalous\), got \[1, 2\]"):
        image_auroc([1, 2, 2], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("decimals", [None, 1, 3])
def test_pixel_auroc_and_f1_max_from_one_sort_equal_the_separate_metrics(decimals: int | None) -> None:
    rng = np.random.default_rng(11)
    masks = rng.random((6, 20, 20)) < 0.1
    maps = (rng.random((6, 20, 20)) + 0.5 * masks).astype(np.float32)
    if decimals is not None:  # ties within and across the two kinds of pixels
        maps = np.round(maps, decimals)
    auroc, f1 = pixel_auroc_and_f1_max(masks, maps)
    assert auroc == pixel_auroc(masks, maps)
    assert f1 == pytest.approx(f1_max(masks, maps), abs=1e-15)
    assert auroc == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    with pytest.raises(DataError, match="both normal and defective"):
        pixel_auroc_and_f1_max(np.zeros_like(masks), maps)


def test_single_class_is_an_error() -> None:
    with pytest.raises(DataError, match=r"both normal and anomalous"):
        image_auroc([0, 0], [0.1, 0.2])
    with pytest.raises(DataError, match=r"defective pixels"):
        pixel_auroc(np.zeros((1, 4, 4), bool), np.ones((1, 4, 4)))


def test_gaussian_blur_matches_scipy_mirror() -> None:
    maps = torch.rand(3, 40, 48, dtype=torch.float64)
    ours = gaussian_blur(maps, 4.0).numpy()
    reference = np.stack([gaussian_filter(m, 4.0, mode="mirror", truncate=4.0) for m in maps.numpy()])
    np.testing.assert_allclose(ours, reference, atol=1e-12)
    assert torch.equal(gaussian_blur(maps, 0), maps)


def test_reductions() -> None:
    maps = torch.tensor([[[1.0, 2.0], [3.0, 10.0]]])
    assert float(reduce_maps(maps, "max")[0]) == 10.0
    assert float(reduce_maps(maps, "mean")[0]) == 4.0
    assert float(reduce_maps(maps, "topk", topk=2)[0]) == 6.5
    with pytest.raises(ValueError, match=r"median"):
        reduce_maps(maps, "median")


def test_distance_maps_and_scores() -> None:
    projector = Projector(3, dtype=torch.float64)
    with torch.no_grad():
        projector.weight.copy_(torch.eye(3, dtype=torch.float64))
        projector.bias.zero_()
    center = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    features = torch.zeros(1, 3, 2, 2, dtype=torch.float64)
    features[0, :, 0, 0] = torch.tensor([1.0, 0.0, 0.0])  # exactly on the center
    features[0, :, 1, 1] = torch.tensor([1.0, 3.0, 4.0])  # distance 5
    squared = distance_maps(projector, center, features)
    assert squared[0].tolist() == [[0.0, 1.0], [1.0, 25.0]]
    assert distance_maps(projector, center, features, squared=False)[0, 1, 1] == 5.0
    maps, scores = score_batch(projector, center, features, image_size=8, sigma=0)
    assert maps.shape == (1, 8, 8) and float(scores[0]) == pytest.approx(float(maps.max()))


def _slow_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The textbook definition: a loop over every distinct threshold, regions measured one by one."""
    from scipy.ndimage import label

    regions = []
    for i, mask in enumerate(masks):
        labelled, count = label(mask, structure=np.ones((3, 3)))
        regions += [(i, labelled == r) for r in range(1, count + 1)]
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        predicted = maps >= threshold
        fpr = (predicted & normal).sum() / normal.sum()
        pro = np.mean([(predicted[i] & region).sum() / region.sum() for i, region in regions])
        points.append((fpr, pro))
    fprs, pros = np.array(points).T
    keep = fprs <= fpr_limit
    xs, ys = list(fprs[keep]), list(pros[keep])
    if xs[-1] < fpr_limit and keep.sum() < len(fprs):
        j = int(keep.sum())
        ys.append(pros[j - 1] + (fpr_limit - fprs[j - 1]) / (fprs[j] - fprs[j - 1]) * (pros[j] - pros[j - 1]))
        xs.append(fpr_limit)
    area = sum((xs[k + 1] - xs[k]) * (ys[k + 1] + ys[k]) / 2 for k in range(len(xs) - 1))
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(6))
def test_aupro_matches_the_threshold_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = np.zeros((4, 20, 20), dtype=bool)
    for i in range(3):  # a few blobs of various sizes, one image defect-free
        for _ in range(rng.integers(1, 4)):
            y, x, h, w = rng.integers(0, 16), rng.integers(0, 16), rng.integers(1, 6), rng.integers(1, 6)
            masks[i, y:y + h, x:x + w] = True
    maps = rng.random(masks.shape) + masks * rng.uniform(0, 1.0)
    if seed % 2:  # heavy ties, as smoothed or quantised maps have
        maps = np.round(maps * 8) / 8
    for limit in (0.3, 1.0, 0.05):
        assert aupro(masks, maps, limit) == pytest.approx(_slow_aupro(masks, maps, limit), abs=1e-6)


def test_aupro_extremes() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 6:8, 0:2] = True
    assert aupro(masks, masks.astype(float)) == pytest.approx(1.0)  # every region found before any false alarm
    assert aupro(masks, (~masks).astype(float)) == pytest.approx(0.0)
    with pytest.raises(DataError):
        aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4)))


def test_f1_max_matches_sklearn_precision_recall() -> None:
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(3)
    labels = rng.random(500) < 0.2
    scores = np.round(rng.random(500) + labels * 0.4, 2)
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0)
    assert f1_max(labels, scores) == pytest.approx(f1.max(), abs=1e-12)
    assert f1_max([0, 1, 1], [0.1, 0.9, 0.8]) == 1.0
