"""Extract frozen features once per dataset category into resumable zarr stores."""

from __future__ import annotations

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


def read_category(root: Path, category: str, check: bool = True, progress: bool = True) -> dict[str, list[Sample]]:
    """Train and test samples of one MVTec-layout category; with ``check``, every file is decoded first."""
    samples = {split: read_split(root, category, split) for split in fs.SPLITS}
    if check:
        check_files(samples["train"] + samples["test"], progress)
    return samples


def gram_and_sums(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-image sum_p f_p f_p^T (B, C, C) and sum_p f_p (B, C), in float64."""
    flat = torch.from_numpy(np.ascontiguousarray(features)).to(torch.float64).flatten(2)
    return torch.bmm(flat, flat.transpose(1, 2)).numpy(), flat.sum(-1).numpy()


def check_finite(features: np.ndarray, samples: list[Sample]) -> None:
    """Stop, naming the image, when a shard's features hold NaN or Inf."""
    finite = np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if not finite.all():
        bad = samples[int(np.flatnonzero(~finite)[0])].path
        raise NumericalError(f"backbone features of {bad} contain NaN or Inf (overflow in {features.dtype}?)")


class CategoryExtractor:
    """Runs the extractor over one category's shards and writes them to a partial store."""

    def __init__(self, extractor: FeatureExtractor, geometry: Geometry, batch_size: int, dtype: str,
                 device: str = "cpu", loader: Callable[[list[Sample]], np.ndarray] | None = None) -> None:
        self.extractor = extractor.to(device)
        self.loader = loader
        self.geometry = geometry
        self.batch_size = batch_size
        self.dtype = np.dtype(dtype)
        self.device = device

    def load(self, samples: list[Sample]) -> np.ndarray:
        """uint8 images (B, crop, crop, 3)."""
        if self.loader is not None:
            return self.loader(samples)
        return np.stack([load_image(s.path, self.geometry) for s in samples])

    def features(self, images: np.ndarray) -> np.ndarray:
        """Aggregated features (B, C, H, W) in the store dtype."""
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start:start + self.batch_size]).to(self.device)
            out.append(self.extractor(batch).float().cpu().numpy().astype(self.dtype))
        return np.concatenate(out)

    def write(self, arrays, shard: int, shard_size: int, items: list[Sample], feats: np.ndarray) -> None:
        """Write one shard's features and statistics (train) or masks (test), then mark it done."""
        sl = slice(shard * shard_size, shard * shard_size + len(items))
        arrays["features"][sl] = feats
        if "gram" in arrays:
            gram, sums = gram_and_sums(feats)
            arrays["gram"][sl] = gram
            arrays["sums"][sl] = sums
        if "masks" in arrays:
            arrays["masks"][sl] = np.stack([
                load_mask(s.mask_path, self.geometry) if s.mask_path is not None
                else np.zeros((self.geometry.crop,) * 2, dtype=bool) for s in items
            ])
        arrays["done"][shard] = True

    def run(self, group, split: str, samples: list[Sample], progress: bool = True,
            on_shard: Callable[[int], None] | None = None) -> int:
        """Compute and write every pending shard of ``split``; returns the number computed.

        Three things overlap: decoding the next shard's images, the backbone on this shard, and writing
        the previous shard (Gram matrices, compression, I/O) in a writer thread.
        """
        pending = fs.pending_shards(group, split)
        size = fs.shard_size(group, split)
        arrays = group[split]

        def shard_samples(k: int) -> list[Sample]:
            return samples[k * size:(k + 1) * size]

        computed = 0
        with ThreadPoolExecutor(max_workers=1) as reader, ThreadPoolExecutor(max_workers=1) as writer, tqdm(
            total=len(pending), desc=f"  {split}", unit="shard", disable=not progress, leave=False
        ) as bar:
            future = reader.submit(self.load, shard_samples(pending[0])) if pending else None
            written: tuple[int, Future] | None = None

            def settle() -> None:
                nonlocal computed
                shard, done = written
                done.result()
                computed += 1
                bar.update()
                if on_shard is not None:
                    on_shard(shard)

            for i, k in enumerate(pending):
                images = future.result()
                if i + 1 < len(pending):
                    future = reader.submit(self.load, shard_samples(pending[i + 1]))
                items = shard_samples(k)
                feats = self.features(images)
                check_finite(feats, items)
                if written is not None:
                    settle()
                written = (k, writer.submit(self.write, arrays, k, size, items, feats))
            if written is not None:
                settle()
        return computed


def store_fingerprint(backbone: dict, geometry: Geometry, layout: fs.StoreLayout,
                      samples: dict[str, list[Sample]]) -> str:
    """Fingerprint of everything that determines a category store's bytes."""
    files = {split: [fs.file_signature(s.path) + ([] if s.mask_path is None else fs.file_signature(s.mask_path))
                     for s in items] for split, items in samples.items()}
    return fs.fingerprint({"backbone": backbone, "geometry": asdict(geometry), "layout": asdict(layout),
                           "files": files, "version": 1})


def extract_category(runner: CategoryExtractor, samples: dict[str, list[Sample]], layout: fs.StoreLayout,
                     backbone: dict, final: Path, partial: Path, progress: bool = True,
                     on_shard: Callable[[int], None] | None = None) -> dict[str, int]:
    """Build (or resume) one category store and move it into place; returns shards computed per split."""
    fp = store_fingerprint(backbone, runner.geometry, layout, samples)
    attrs = {"backbone": backbone, "geometry": asdict(runner.geometry), "layout": asdict(layout)}
    group = fs.create_or_resume(partial, fp, layout, samples, attrs)
    computed = {split: runner.run(group, split, items, progress, on_shard) for split, items in samples.items()}
    fs.finalize(partial, final)
    return computed
