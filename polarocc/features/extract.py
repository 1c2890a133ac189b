"""Extract frozen features once per dataset category into resumable zarr stores."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from polarocc.data.images import Geometry, load_image, load_mask
from polarocc.data.mvtec import check_files, read_split
from polarocc.data.samples import Sample
from polarocc.errors import NumericalError
from polarocc.features import store as fs
from polarocc.models.backbone import FeatureExtractor
from polarocc.models.tiling import for_geometry


def read_category(root: Path, category: str, check: bool = True, progress: bool = True) -> dict[str, list[Sample]]:
    """Train and test samples of one MVTec-layout category; with ``check``, every file is decoded first."""
    samples = {split: read_split(root, category, split) for split in fs.SPLITS}
    if check:
        check_files(samples["train"] + samples["test"], progress)
    return samples


def _per_image(features: np.ndarray, step: Callable[[torch.Tensor, int], None]) -> None:
    """Call ``step(f, i)`` with each image's (C, positions) features converted to float64, one image at a time
    through reused buffers: converting a whole shard at once costs more than the arithmetic (70 MB of fresh memory
    for 16 Lite0 images). Half precision goes through float32 (faster, and exact: the values are those of a direct
    conversion)."""
    flat = torch.from_numpy(np.ascontiguousarray(features)).flatten(2)
    half = flat.dtype in (torch.float16, torch.bfloat16)
    staging = torch.empty(flat.shape[1:], dtype=torch.float32) if half else None
    converted = torch.empty(flat.shape[1:], dtype=torch.float64)
    for i in range(len(flat)):
        converted.copy_(flat[i] if staging is None else staging.copy_(flat[i]))
        step(converted, i)


def gram_and_sums(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image sum_p f_p f_p^T (B, C, C) and sum_p f_p (B, C), in float64.

    Each image's matrix product and row sums are those a batched ``torch.bmm`` / ``sum(-1)`` over the whole
    float64 shard computes, up to the order of the products' float64 sums (bit-equal on some CPUs); the same
    features always give the same bits."""
    b, c = features.shape[:2]
    gram = torch.empty(b, c, c, dtype=torch.float64)
    sums = torch.empty(b, c, dtype=torch.float64)

    def step(f: torch.Tensor, i: int) -> None:
        torch.mm(f, f.T, out=gram[i])
        torch.sum(f, -1, out=sums[i])

    _per_image(features, step)
    return gram.numpy(), sums.numpy()


def feature_sums(features: np.ndarray) -> np.ndarray:
    """Per-image sum_p f_p (B, C) in float64, equal to the sums :func:`gram_and_sums` returns."""
    sums = torch.empty(features.shape[:2], dtype=torch.float64)
    _per_image(features, lambda f, i: torch.sum(f, -1, out=sums[i]))
    return sums.numpy()


def _scan(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (first axis): (holds NaN or Inf, holds a non-zero value)."""
    if features.dtype == np.float16 and features.flags.c_contiguous:
        # The largest magnitude's bits, in one vectorised, threaded pass over int16 (numpy's float16 isfinite is
        # scalar code): exponent bits all set is exactly NaN or Inf, and zero bits everywhere is +-0.
        bits = torch.from_numpy(features).view(torch.int16).flatten(1)
        largest = (bits & 0x7FFF).amax(dim=1)
        return largest.ge(0x7C00).numpy(), largest.gt(0).numpy()
    flat = features.reshape(len(features), -1)
    return ~np.isfinite(flat).all(axis=1), (flat != 0).any(axis=1)


def check_finite(features: np.ndarray, samples: list[Sample]) -> np.ndarray:
    """Stop, naming the image, when a shard's features hold NaN or Inf; else return, per image, whether it holds
    a non-zero value."""
    bad, nonzero = _scan(features)
    if bad.any():
        path = samples[int(np.flatnonzero(bad)[0])].path
        raise NumericalError(f"backbone features of {path} contain NaN or Inf (overflow in {features.dtype}?)")
    return nonzero


def _write(array, rows: slice, values: np.ndarray, nonempty: bool) -> None:
    """``array[rows] = values``. zarr compares every chunk it writes with the fill value (0) to skip empty ones,
    in numpy code slower than compressing it; ``nonempty`` (every chunk written holds a non-zero value, so none
    would be skipped) turns the comparison off, and the bytes written are the same."""
    (array.with_config({"write_empty_chunks": True}) if nonempty else array)[rows] = values


class CategoryExtractor:
    """Runs the extractor over one category's shards and writes them to a partial store."""

    def __init__(self, extractor: FeatureExtractor, geometry: Geometry, batch_size: int, dtype: str,
                 device: str = "cpu", loader: Callable[[list[Sample]], np.ndarray] | None = None) -> None:
        self.extractor = for_geometry(extractor, geometry).to(device)
        self.loader = loader
        self.geometry = geometry
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.device = device
        self._torch_dtype = torch.from_numpy(np.empty(0, dtype=self.dtype)).dtype
        # The multi-scale extractor writes its output in the store dtype directly; others return float32.
        self._direct = "dtype" in inspect.signature(extractor.forward).parameters

    def load(self, samples: list[Sample]) -> np.ndarray:
        """uint8 model inputs (B, height, width, 3)."""
        if self.loader is not None:
            return self.loader(samples)
        return np.stack([load_image(s.path, self.geometry) for s in samples])

    def features(self, images: np.ndarray) -> np.ndarray:
        """Aggregated features (B, C, H, W) in the store dtype.

        The float32 result is rounded to the store dtype by torch (as it is assembled, for the multi-scale
        extractor): bit for bit numpy's ``astype``, several times faster, and on a GPU before the transfer.
        """
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start:start + self.batch_size]).to(self.device)
            result = self.extractor(batch, dtype=self._torch_dtype) if self._direct else self.extractor(batch)
            out.append(result.to(self._torch_dtype).cpu().numpy())
        return np.ascontiguousarray(out[0]) if len(out) == 1 else np.concatenate(out)

    def write(self, arrays, shard: int, shard_size: int, items: list[Sample], feats: np.ndarray) -> None:
        """Check one shard's features for NaN/Inf (a bad shard stays pending, nothing of it written), write them
        with their statistics (train) or masks (test), then mark the shard done."""
        nonzero = check_finite(feats, items)
        sl = slice(shard * shard_size, shard * shard_size + len(items))
        # One chunk per image: none is empty when every image holds a non-zero value.
        _write(arrays["features"], sl, feats, bool(nonzero.all()))
        if "gram" in arrays:
            gram, sums = gram_and_sums(feats)
            # A non-zero image's Gram diagonal is a sum of squares > 0 (the smallest float16 squared is a float64).
            _write(arrays["gram"], sl, gram, bool(nonzero.any()))
            _write(arrays["sums"], sl, sums, bool(sums.any()))
        elif "sums" in arrays:
            sums = feature_sums(feats)
            _write(arrays["sums"], sl, sums, bool(sums.any()))
        if "masks" in arrays:
            arrays["masks"][sl] = np.stack([
                load_mask(s.mask_path, self.geometry) if s.mask_path is not None
                else np.zeros(self.geometry.size, dtype=bool) for s in items
            ])
        arrays["done"][shard] = True

    def run(self, group, split: str, samples: list[Sample], progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> int:
        """Compute and write every pending shard of ``split``; returns the number computed."""
        return self.run_splits(group, {split: samples}, progress, on_shard)[split]

    def _lanes(self) -> tuple[int, int]:
        """How many shards the backbone runs on at once, and the torch threads of each.

        On a CPU, two shards at once, each with the calling thread's torch thread count: a forward spends part of
        its time in OpenMP barriers and single-threaded stretches, which the other shard's forward fills. The
        thread count is never changed: it selects the convolution algorithms, and a forward with fewer threads
        can round differently. On a GPU, or with one thread, one shard at a time."""
        threads = torch.get_num_threads()
        return (2 if self.device == "cpu" and threads >= 2 else 1), threads

    def run_splits(self, group, samples: dict[str, list[Sample]], progress: bool = True,
                   on_shard: Callable[[int], None] | None = None) -> dict[str, int]:
        """Compute and write every pending shard of every split, in order; returns the number computed per split.

        One pipeline across the splits: a reader thread decodes the images of the shards ahead, the backbone runs
        back to back on them (see :meth:`_lanes`), and a writer thread checks each computed shard for NaN/Inf and
        writes it with its statistics (Gram matrices, compression, I/O) or masks. Shards are written in order and
        at most one at a time: each is settled (``on_shard``, progress) before the next one is handed to the
        writer, so a stop in ``on_shard`` leaves every later shard pending.
        """
        sizes = {split: fs.shard_size(group, split) for split in samples}
        jobs = [(split, k) for split in samples for k in fs.pending_shards(group, split)]

        def shard_samples(job: tuple[str, int]) -> list[Sample]:
            split, k = job
            return samples[split][k * sizes[split]:(k + 1) * sizes[split]]

        computed = dict.fromkeys(samples, 0)
        totals = {split: sum(1 for s, _ in jobs if s == split) for split in samples}
        bars: dict[str, tqdm] = {}

        def settle(written: tuple[str, int, Future]) -> None:
            split, shard, done = written
            done.result()
            computed[split] += 1
            if split not in bars:  # one bar per split, each closed before the next opens
                bars[split] = tqdm(total=totals[split], desc=f"  {split}", unit="shard", disable=not progress,
                                   leave=False)
            bars[split].update()
            if computed[split] == totals[split]:
                bars[split].close()
            if on_shard is not None:
                on_shard(shard)

        lanes, threads = self._lanes()
        try:
            with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer, \
                    self._forward_pool(lanes, threads) as forward:
                decoded: dict[int, Future] = {}
                computing: dict[int, Future] = {}
                written: tuple[str, int, Future] | None = None
                for i, job in enumerate(jobs):
                    for j in range(i, min(len(jobs), i + lanes + 1)):  # the images of the shards ahead
                        if j not in decoded:
                            decoded[j] = reader.submit(self.load, shard_samples(jobs[j]))
                    for j in range(i, min(len(jobs), i + lanes)):
                        if j not in computing:
                            computing[j] = forward.submit(lambda images: self.features(images.result()), decoded[j])
                    feats = computing.pop(i).result()
                    del decoded[i]
                    if written is not None:
                        settle(written)
                    split, k = job
                    written = (split, k, writer.submit(self.write, group[split], k, sizes[split],
                                                       shard_samples(job), feats))
                if written is not None:
                    settle(written)
        finally:
            for bar in bars.values():
                bar.close()
        return computed

    @staticmethod
    def _forward_pool(lanes: int, threads: int) -> ThreadPoolExecutor:
        """``lanes`` threads for the backbone, each with ``threads`` torch threads (those of the calling thread)."""
        changed = threading.Event()

        def init() -> None:
            if torch.get_num_threads() != threads:  # a new thread starts with torch's default
                torch.set_num_threads(threads)
                changed.set()

        started = threading.Barrier(lanes + 1)
        pool = ThreadPoolExecutor(max_workers=lanes, initializer=init)
        for _ in range(lanes):
            pool.submit(started.wait)  # start every lane now
        started.wait()
        if changed.is_set():  # torch records a count set in any thread as the default of new threads
            torch.set_num_threads(threads)
        return pool


def store_fingerprint(backbone: dict, geometry: Geometry, layout: fs.StoreLayout,
                      samples: dict[str, list[Sample]]) -> str:
    """Fingerprint of everything that determines a category store's bytes."""
    files = {split: [fs.file_signature(s.path) + ([] if s.mask_path is None else fs.file_signature(s.mask_path))
                     for s in items] for split, items in samples.items()}
    return fs.fingerprint({"backbone": backbone, "geometry": geometry.record(), "layout": asdict(layout),
                           "files": files, "version": 1})


def extract_category(runner: CategoryExtractor, samples: dict[str, list[Sample]], layout: fs.StoreLayout,
                     backbone: dict, final: Path, partial: Path, progress: bool = True,
                     on_shard: Callable[[int], None] | None = None) -> dict[str, int]:
    """Build (or resume) one category store and move it into place; returns shards computed per split."""
    fp = store_fingerprint(backbone, runner.geometry, layout, samples)
    attrs = {"backbone": backbone, "geometry": runner.geometry.record(), "layout": asdict(layout)}
    group = fs.create_or_resume(partial, fp, layout, samples, attrs)
    computed = runner.run_splits(group, samples, progress, on_shard)
    fs.finalize(partial, final)
    return computed
