"""The faster extraction path writes the same bits as the plain one: float16 aggregation, per-image statistics,
the NaN/Inf scan and zarr writes without the empty-chunk comparison."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from polarocc.data.images import Geometry
from polarocc.data.samples import Sample
from polarocc.errors import NumericalError
from polarocc.features import store as fs
from polarocc.features.extract import (
    CategoryExtractor,
    check_finite,
    extract_category,
    feature_sums,
    gram_and_sums,
    read_category,
)
from polarocc.models.backbone import MultiScaleAggregator


def _reference_aggregate(levels: list[torch.Tensor], pool: int) -> torch.Tensor:
    size = levels[0].shape[-2:]
    out = []
    for level in levels:
        if pool > 1:
            level = F.avg_pool2d(level, pool, stride=1, padding=pool // 2)
        if level.shape[-2:] != size:
            level = F.interpolate(level, size=size, mode="bilinear", align_corners=False)
        out.append(level)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_aggregator_in_float16_rounds_the_float32_result_once(channels_last: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    levels = [torch.randn(2, c, s, s, generator=gen) * 10.0 ** torch.randint(-6, 5, (1,), generator=gen)
              for c, s in ((3, 16), (5, 8), (7, 4))]
    levels[2][0, 0, 0, 0] = 7e4  # rounds to inf in float16, as numpy's cast would
    if channels_last:  # what the backbone returns for NHWC images
        levels = [level.contiguous(memory_format=torch.channels_last) for level in levels]
    reference = _reference_aggregate(levels, 3)
    agg = MultiScaleAggregator(3)
    assert torch.equal(agg(levels), reference)
    half = agg(levels, torch.float16)
    assert half.dtype == torch.float16 and half.is_contiguous()
    expected = reference.numpy().astype(np.float16)
    np.testing.assert_array_equal(half.numpy().view(np.uint16), expected.view(np.uint16))


def test_extractor_output_in_the_store_dtype_equals_numpy_cast(lite0) -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8))
    expected = lite0(images).numpy().astype(np.float16)
    runner = CategoryExtractor(lite0, Geometry(72, 64), batch_size=4, dtype="float16")
    np.testing.assert_array_equal(runner.features(images.numpy()).view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape", [(3, 176, 16, 16), (2, 64, 7, 9), (4, 5, 1, 1)])
def test_per_image_statistics_equal_the_batched_products(shape: tuple[int, ...], dtype: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 8, shape)
    features = x.astype(dtype)
    flat = torch.from_numpy(features).to(torch.float64).flatten(2)
    gram, sums = gram_and_sums(features)
    # Per-image products and one batched product may block the sums differently (bit-equal on AMD EPYC, not on
    # every Intel CPU): both are within the float64 bound of a length-P dot product, P eps sum_p |f_i f_j|.
    magnitude = torch.bmm(flat.abs(), flat.abs().transpose(1, 2)).numpy()
    error = np.abs(gram - torch.bmm(flat, flat.transpose(1, 2)).numpy())
    assert (error <= flat.shape[-1] * np.finfo(np.float64).eps * magnitude).all()
    np.testing.assert_array_equal(gram, gram_and_sums(features)[0])  # and the same bits every time
    np.testing.assert_array_equal(sums, flat.sum(-1).numpy())
    np.testing.assert_array_equal(feature_sums(features), sums)
    np.testing.assert_array_equal(gram_and_sums(features[:, :, ::2])[0], gram_and_sums(features[:, :, ::2].copy())[0])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scan_names_the_bad_image_and_flags_zero_images(dtype: str) -> None:
    samples = [Sample(Path(f"{i}.png"), 0) for i in range(4)]
    features = np.ones((4, 3, 2, 2), dtype=dtype)
    features[1] = 0.0
    features[2] = -0.0  # zero bits only in the sign: not the fill value, but not claimed non-zero either
    features[3, 0, 0, 0] = -0.5
    np.testing.assert_array_equal(check_finite(features, samples), [True, False, False, True])
    for bad in (np.inf, -np.inf, np.nan):
        broken = features.copy()
        broken[3, 2, 1, 1] = bad
        with pytest.raises(NumericalError, match=r"3\.png contain NaN or Inf"):
            check_finite(broken, samples)


def _files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.mark.parametrize("empty_image", [False, True])
def test_writes_equal_plain_zarr_assignment(tmp_path: Path, empty_image: bool) -> None:
    layout = fs.StoreLayout(6, 4, 4, 8, "float16", shard_images=4, compressor="lz4", level=5)
    samples = {"train": [Sample(Path(f"t{i}.png"), 0) for i in range(6)]}
    rng = np.random.default_rng(2)
    features = rng.standard_normal((6, 6, 4, 4)).astype(np.float16)
    if empty_image:
        features[5] = 0.0  # an empty image chunk in the second (partial) shard: zarr leaves it out
    writer = CategoryExtractor.__new__(CategoryExtractor)
    writer.geometry = Geometry(8, 8)
    ours = fs.create_or_resume(tmp_path / "ours.zarr", "x", layout, samples, {})
    plain = fs.create_or_resume(tmp_path / "plain.zarr", "x", layout, samples, {})
    for shard, rows in ((0, slice(0, 4)), (1, slice(4, 6))):
        writer.write(ours["train"], shard, 4, samples["train"][rows], features[rows])
        gram, sums = gram_and_sums(features[rows])
        for name, values in (("features", features[rows]), ("gram", gram), ("sums", sums)):
            plain["train"][name][rows] = values
        plain["train"]["done"][shard] = True
    assert _files(tmp_path / "ours.zarr") == _files(tmp_path / "plain.zarr")
    np.testing.assert_array_equal(zarr.open_group(tmp_path / "ours.zarr")["train/features"][:], features)


def test_two_forward_lanes_write_what_one_does_and_leave_thread_counts_alone(
        lite0, mvtec_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads = torch.get_num_threads()
    samples = read_category(mvtec_tree, "brick", check=False, progress=False)
    layout = fs.StoreLayout(176, 16, 16, 64, "float16", shard_images=4, compressor="lz4", level=5)
    runner = CategoryExtractor(lite0, Geometry(72, 64), batch_size=4, dtype="float16")
    lanes = max(runner._lanes()[0], 2)
    for name, count in (("one", 1), ("two", lanes)):
        monkeypatch.setattr(CategoryExtractor, "_lanes", lambda self, n=count: (n, threads))
        seen: list[int] = []
        extract_category(runner, samples, layout, {"name": "lite0"}, tmp_path / name / "final.zarr",
                         tmp_path / name / "partial.zarr", progress=False, on_shard=seen.append)
        assert seen == [0, 1, 0, 1]  # settled in order: 6 train and 7 test images in shards of 4
    assert _files(tmp_path / "one" / "final.zarr") == _files(tmp_path / "two" / "final.zarr")
    assert torch.get_num_threads() == threads
    started: list[int] = []
    thread = threading.Thread(target=lambda: started.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    assert started == [threads]  # the default of new threads too
