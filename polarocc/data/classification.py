"""Readers of image classification datasets for one-vs-rest one-class evaluation (Protocol A).

Each reader returns a :class:`ClassificationSplits`: uint8 RGB images (in memory for array formats,
file paths for folder trees), integer labels and class names, for a train and a test split. Nothing
is downloaded: a missing folder or file raises a :class:`DataError` naming where to get the data.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polarocc.errors import DataError
from polarocc.safe_load import load_plain_pickle

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html (CIFAR-10 python version)"
FMNIST_URL = "https://github.com/zalandoresearch/fashion-mnist (the four idx files)"


@dataclass(frozen=True)
class ClassSplit:
    """Images (N, H, W, 3) uint8 or a list of image paths, with integer labels (N,)."""

    images: np.ndarray | list[Path]
    labels: np.ndarray
    kinds: list[str] | None = None  # defect type per image ('good' = normal) for within-class detection

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassificationSplits:
    """Train and test splits with the names of the classes the labels index."""

    train: ClassSplit
    test: ClassSplit
    classes: tuple[str, ...]


def _require(path: Path, what: str, source: str) -> Path:
    if not path.exists():
        raise DataError(f"{what} not found at {path}; get it from {source} and set the dataset's path param")
    return path


def _to_rgb(gray_or_rgb: np.ndarray) -> np.ndarray:
    return np.repeat(gray_or_rgb[..., None], 3, axis=-1) if gray_or_rgb.ndim == 3 else gray_or_rgb


def _unpickle(path: Path, source: str = CIFAR10_URL) -> dict:
    """A CIFAR python batch as a dict with bytes keys, read without ever running code from the file (the
    batches are pickles, and a tampered one could otherwise run anything); ``source`` names where to get it."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read CIFAR python batch {path} ({exc})") from exc
    try:
        batch = load_plain_pickle(data, encoding="bytes")
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path} is not a readable CIFAR python batch ({exc}); polarocc never runs code from "
                        f"dataset files: replace it with the original from {source}") from exc
    except Exception as exc:  # a damaged pickle fails in many ways (EOFError, ValueError, TypeError, ...)
        raise DataError(f"{path} is not a readable CIFAR python batch ({type(exc).__name__}: {exc}); replace it "
                        f"with the original from {source}") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a readable CIFAR python batch (it holds a {type(batch).__name__}, not a "
                        f"dict); replace it with the original from {source}")
    return batch


def _field(batch: dict, key: bytes, path: Path) -> object:
    """``batch[key]``, or an error naming the file and the missing key."""
    if key not in batch:
        found = ", ".join(sorted(repr(k) for k in batch)) or "nothing"
        raise DataError(f"{path} is not a readable CIFAR python batch (no {key!r} entry; found {found}); "
                        "replace it with the original file")
    return batch[key]


def _cifar_images(batch: dict, path: Path) -> np.ndarray:
    try:
        data = np.asarray(_field(batch, b"data", path), dtype=np.uint8)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: the data entry is not an array of bytes ({exc})") from exc
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: expected data of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_labels(batch: dict, key: bytes, path: Path, count: int) -> np.ndarray:
    try:
        labels = np.asarray(_field(batch, key, path), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: the {key.decode()} entry is not a list of integers ({exc})") from exc
    if labels.shape != (count,):
        raise DataError(f"{path}: {labels.shape} {key.decode()} do not match {count} images")
    return labels


def _cifar_names(batch: dict, key: bytes, path: Path) -> tuple[str, ...]:
    names = _field(batch, key, path)
    if not isinstance(names, list | tuple) or not all(isinstance(n, bytes | str) for n in names):
        raise DataError(f"{path}: the {key.decode()} entry is not a list of names")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def read_cifar10(root: Path) -> ClassificationSplits:
    """CIFAR-10 python batches: ``<root>/data_batch_{1..5}``, ``test_batch``, ``batches.meta``.

    ``root`` may also be the folder holding ``cifar-10-batches-py``.
    """
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    files = [_require(root / f"data_batch_{i}", "CIFAR-10 training batch", CIFAR10_URL) for i in range(1, 6)]
    test_file = _require(root / "test_batch", "CIFAR-10 test batch", CIFAR10_URL)
    meta = _unpickle(_require(root / "batches.meta", "CIFAR-10 batches.meta", CIFAR10_URL))
    classes = _cifar_names(meta, b"label_names", root / "batches.meta")
    splits = []
    for paths in (files, [test_file]):
        images, labels = [], []
        for path in paths:
            batch = _unpickle(path)
            images.append(_cifar_images(batch, path))
            labels.append(_cifar_labels(batch, b"labels", path, len(images[-1])))
        splits.append(ClassSplit(np.concatenate(images), np.concatenate(labels)))
    return ClassificationSplits(splits[0], splits[1], classes)


def read_cifar100(root: Path, coarse: bool = True) -> ClassificationSplits:
    """CIFAR-100 python files ``<root>/{train,test,meta}``; ``coarse`` uses the 20 superclasses."""
    root = Path(root)
    if (root / "cifar-100-python").is_dir():
        root = root / "cifar-100-python"
    source = CIFAR10_URL.replace("CIFAR-10", "CIFAR-100")
    key, names = (b"coarse_labels", b"coarse_label_names") if coarse else (b"fine_labels", b"fine_label_names")
    parts = {}
    for split in ("train", "test"):
        path = _require(root / split, f"CIFAR-100 {split} file", source)
        batch = _unpickle(path, source)
        images = _cifar_images(batch, path)
        parts[split] = ClassSplit(images, _cifar_labels(batch, key, path, len(images)))
    meta_path = _require(root / "meta", "CIFAR-100 meta file", source)
    classes = _cifar_names(_unpickle(meta_path, source), names, meta_path)
    return ClassificationSplits(parts["train"], parts["test"], classes)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DataError(f"cannot read idx file {path} ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file (bad magic number)")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise DataError(f"{path} is truncated: header promises {expected} bytes, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _idx_file(root: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    return _require(root / f"{stem}.gz", "Fashion-MNIST idx file", FMNIST_URL)


FMNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot")


def read_fashion_mnist(root: Path) -> ClassificationSplits:
    """Fashion-MNIST idx files (gzipped or not): ``train-images-idx3-ubyte`` and its three siblings."""
    root = Path(root)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {split}: {images.shape} images do not match {labels.shape} labels")
        splits[split] = ClassSplit(_to_rgb(images), labels)
    return ClassificationSplits(splits["train"], splits["test"], FMNIST_CLASSES)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image_folder(root: Path) -> ClassificationSplits:
    """A class-per-folder tree ``<root>/{train,test}/<class>/<image>`` (e.g. Cats-vs-Dogs sorted by class)."""
    root = Path(root)
    parts: dict[str, tuple[list[Path], list[str]]] = {}
    for split in ("train", "test"):
        base = root / split
        if not base.is_dir():
            raise DataError(f"{base} does not exist: a class-per-folder dataset needs {split}/<class>/<images>")
        paths, names = [], []
        for folder in sorted(p for p in base.iterdir() if p.is_dir()):
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"class folder {folder} holds no images")
            paths += files
            names += [folder.name] * len(files)
        if not paths:
            raise DataError(f"{base} holds no class folders")
        parts[split] = (paths, names)
    classes = tuple(sorted(set(parts["train"][1])))
    unknown = sorted(set(parts["test"][1]) - set(classes))
    if unknown:
        raise DataError(f"{root / 'test'} has classes missing from train: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}

    def split(paths: list[Path], names: list[str]) -> ClassSplit:
        return ClassSplit(paths, np.array([index[n] for n in names], dtype=np.int64))

    return ClassificationSplits(split(*parts["train"]), split(*parts["test"]), classes)


def read_digits(test_fraction: float = 0.5, seed: int = 1024, size: int = 32) -> ClassificationSplits:
    """scikit-learn's handwritten digits (8x8, shipped offline), upscaled to ``size`` and split per class."""
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    gray = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((size, size), Image.Resampling.BILINEAR)) for g in gray])
    train_x, test_x, train_y, test_y = train_test_split(_to_rgb(big), digits.target.astype(np.int64),
                                                        test_size=test_fraction, random_state=seed,
                                                        stratify=digits.target)
    return ClassificationSplits(ClassSplit(train_x, train_y), ClassSplit(test_x, test_y),
                                tuple(str(i) for i in range(10)))


def read_mvtec_image_level(root: Path, categories: tuple[str, ...] | None = None) -> ClassificationSplits:
    """MVTec AD (or MPDD, or VisA converted) at image level: one class per category.

    Unlike one-vs-rest, a category's normal images are its ``train/good`` images and its test split is
    its own test images, anomalous when their defect type is not ``good``.
    """
    from polarocc.data.mvtec import read_split

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MVTec-layout folder {root} does not exist; set the dataset's path param")
    names = categories or tuple(sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir()))
    if not names:
        raise DataError(f"{root} holds no <category>/train/good folders (MVTec AD layout)")
    parts: dict[str, tuple[list[Path], list[int], list[str]]] = {"train": ([], [], []), "test": ([], [], [])}
    for index, category in enumerate(names):
        for split in ("train", "test"):
            for sample in read_split(root, category, split):
                paths, labels, kinds = parts[split]
                paths.append(sample.path)
                labels.append(index)
                kinds.append(sample.defect_type)
    train, test = ({"images": p, "labels": np.array(y, dtype=np.int64), "kinds": k} for p, y, k in parts.values())
    return ClassificationSplits(ClassSplit(**train), ClassSplit(**test), tuple(names))

