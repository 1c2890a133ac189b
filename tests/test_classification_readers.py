"""Protocol A readers on tiny files written in each dataset's true on-disk format."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from polarocc.data.classification import (
    read_cifar10,
    read_cifar100,
    read_digits,
    read_fashion_mnist,
    read_image_folder,
)
from polarocc.errors import DataError


def _pickle(obj: dict, path: Path) -> None:
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def test_cifar10(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rows = {}
    for i in range(1, 6):
        rows[i] = _cifar_rows(2, i)
        _pickle({b"data": rows[i], b"labels": [i % 10, (i + 1) % 10]}, root / f"data_batch_{i}")
    _pickle({b"data": _cifar_rows(3, 9), b"labels": [0, 1, 2]}, root / "test_batch")
    names = [n.encode() for n in ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                  "truck")]
    _pickle({b"label_names": names}, root / "batches.meta")
    data = read_cifar10(tmp_path)
    assert data.train.images.shape == (10, 32, 32, 3) and data.test.images.shape == (3, 32, 32, 3)
    assert data.train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert data.classes[3] == "cat"
    # channel-first rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(data.train.images[0, :, :, 0].ravel(), rows[1][0, :1024])
    np.testing.assert_array_equal(data.train.images[0, :, :, 2].ravel(), rows[1][0, 2048:])


def test_cifar100_superclasses(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    _pickle({b"data": _cifar_rows(4, 1), b"coarse_labels": [0, 19, 5, 5], b"fine_labels": [4, 99, 7, 8]},
            root / "train")
    _pickle({b"data": _cifar_rows(2, 2), b"coarse_labels": [19, 0], b"fine_labels": [99, 4]}, root / "test")
    _pickle({b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
             b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}, root / "meta")
    coarse = read_cifar100(tmp_path)
    assert len(coarse.classes) == 20 and coarse.train.labels.tolist() == [0, 19, 5, 5]
    fine = read_cifar100(root, coarse=False)
    assert len(fine.classes) == 100 and fine.test.labels.tolist() == [99, 4]


def _idx(array: np.ndarray, path: Path, compress: bool) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist(tmp_path: Path, compress: bool) -> None:
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 256, (2, 28, 28))
    _idx(train, tmp_path / "train-images-idx3-ubyte", compress)
    _idx(np.array([0, 1, 2, 3, 9]), tmp_path / "train-labels-idx1-ubyte", compress)
    _idx(test, tmp_path / "t10k-images-idx3-ubyte", compress)
    _idx(np.array([9, 0]), tmp_path / "t10k-labels-idx1-ubyte", compress)
    data = read_fashion_mnist(tmp_path)
    assert data.train.images.shape == (5, 28, 28, 3)
    np.testing.assert_array_equal(data.train.images[..., 1], train)
    assert data.test.labels.tolist() == [9, 0] and data.classes[9] == "Ankle boot"


def test_fashion_mnist_truncated_and_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"Fashion-MNIST idx file not found .*fashion-mnist"):
        read_fashion_mnist(tmp_path)
    _idx(np.zeros((3, 4, 4)), tmp_path / "train-images-idx3-ubyte", False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    _idx(np.zeros(3), tmp_path / "train-labels-idx1-ubyte", False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated"):
        read_fashion_mnist(tmp_path)


def test_image_folder(tmp_path: Path) -> None:
    for split, counts in (("train", {"cat": 3, "dog": 2}), ("test", {"cat": 1, "dog": 2})):
        for name, n in counts.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 10)).save(tmp_path / split / name / f"{name}.{i}.jpg")
    data = read_image_folder(tmp_path)
    assert data.classes == ("cat", "dog")
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1] and data.test.labels.tolist() == [0, 1, 1]
    assert data.test.images[1].name == "dog.0.jpg"
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "bird" / "b.png")
    with pytest.raises(DataError, match=r"classes missing from train: bird"):
        read_image_folder(tmp_path)


def test_digits_is_real_and_stratified() -> None:
    data = read_digits()
    assert data.train.images.shape[1:] == (32, 32, 3) and data.train.images.dtype == np.uint8
    assert len(data.train) + len(data.test) == 1797
    assert sorted(set(data.test.labels.tolist())) == list(range(10))
    counts = np.bincount(data.train.labels)
    assert counts.min() >= 85  # about half of each class's ~180 images


def test_empty_class_folder(tmp_path: Path) -> None:
    for split in ("train", "test"):
        (tmp_path / split / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / split / "cat" / "a.png")
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"class folder .*train/dog holds no images"):
        read_image_folder(tmp_path)
