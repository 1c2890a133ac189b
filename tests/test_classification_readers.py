"""Protocol A readers on tiny files written in each dataset's true on-disk format."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
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


class _Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's cPickle wrote its str (SHORT_BINSTRING/BINSTRING), as in the real
    CIFAR files, instead of Python 3's ``_codecs.encode`` calls."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str


def _pickle(obj: dict, path: Path, protocol: int | str = pickle.DEFAULT_PROTOCOL) -> None:
    """``obj`` pickled as Python 3 does (``protocol`` a number) or as Python 2's cPickle did (``"py2"``)."""
    if protocol == "py2":
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(obj)
        # numpy 1.x and Python 2 named the array constructor's module numpy.core.multiarray
        path.write_bytes(buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
        return
    with path.open("wb") as fh:
        pickle.dump(obj, fh, protocol=protocol)


class _RunsCode:
    """Unpickling this runs a shell command: what a tampered dataset file could do with ``pickle.load``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def _malicious(path: Path, flag: Path) -> None:
    path.write_bytes(pickle.dumps({b"data": _RunsCode(f"touch {flag}"), b"labels": [0]}, protocol=2))


def _cifar_rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _cifar10_tree(root: Path) -> dict[int, np.ndarray]:
    """A CIFAR-10 python tree under ``root``; returns the rows of each training batch."""
    root.mkdir(parents=True)
    rows = {}
    for i in range(1, 6):
        rows[i] = _cifar_rows(2, i)
        # the real files come from Python 2's cPickle (protocol 2): write some that way, some as Python 3 would
        protocol = {1: "py2", 2: 2}.get(i, pickle.DEFAULT_PROTOCOL)
        _pickle({b"data": rows[i], b"labels": [i % 10, (i + 1) % 10]}, root / f"data_batch_{i}", protocol)
    _pickle({b"data": _cifar_rows(3, 9), b"labels": [0, 1, 2]}, root / "test_batch", 2)
    _pickle({b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_cases_per_batch": 2},
            root / "batches.meta", "py2")
    return rows


def _cifar100_tree(root: Path) -> None:
    root.mkdir(parents=True)
    _pickle({b"data": _cifar_rows(4, 1), b"coarse_labels": [0, 19, 5, 5], b"fine_labels": [4, 99, 7, 8]},
            root / "train", "py2")
    _pickle({b"data": _cifar_rows(2, 2), b"coarse_labels": [19, 0], b"fine_labels": [99, 4]}, root / "test", 2)
    _pickle({b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
             b"fine_label_names": [f"fine{i}".encode() for i in range(100)]}, root / "meta", "py2")


def test_python2_pickles_are_written_as_the_real_files_are(tmp_path: Path) -> None:
    _pickle({b"data": _cifar_rows(1, 0)}, tmp_path / "py2", "py2")
    raw = (tmp_path / "py2").read_bytes()
    assert raw.startswith(b"\x80\x02") and b"_codecs" not in raw and b"cnumpy.core.multiarray\n" in raw


def test_cifar10(tmp_path: Path) -> None:
    rows = _cifar10_tree(tmp_path / "cifar-10-batches-py")
    data = read_cifar10(tmp_path)
    assert data.train.images.shape == (10, 32, 32, 3) and data.test.images.shape == (3, 32, 32, 3)
    assert data.train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert data.classes[3] == "cat"
    # channel-first rows: the first 1024 bytes are the red plane
    np.testing.assert_array_equal(data.train.images[0, :, :, 0].ravel(), rows[1][0, :1024])
    np.testing.assert_array_equal(data.train.images[0, :, :, 2].ravel(), rows[1][0, 2048:])
    np.testing.assert_array_equal(data.train.images[2, :, :, 1].ravel(), rows[2][0, 1024:2048])


def test_cifar100_superclasses(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    _cifar100_tree(root)
    coarse = read_cifar100(tmp_path)
    assert len(coarse.classes) == 20 and coarse.train.labels.tolist() == [0, 19, 5, 5]
    fine = read_cifar100(root, coarse=False)
    assert len(fine.classes) == 100 and fine.test.labels.tolist() == [99, 4]


def test_cifar10_malicious_batch_is_refused_without_running_it(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _cifar10_tree(root)
    flag = tmp_path / "pwned"
    _malicious(root / "data_batch_1", flag)
    with pytest.raises(DataError, match=r"data_batch_1 is not a readable CIFAR python batch .*(posix|nt)\.system") \
            as err:
        read_cifar10(tmp_path)
    assert "\n" not in str(err.value)
    assert not flag.exists()


def test_cifar100_malicious_meta_is_refused_without_running_it(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    _cifar100_tree(root)
    flag = tmp_path / "pwned"
    _malicious(root / "meta", flag)
    with pytest.raises(DataError, match=r"cifar-100-python/meta is not a readable CIFAR python batch .*CIFAR-100"):
        read_cifar100(tmp_path)
    assert not flag.exists()


@pytest.mark.parametrize(("content", "reason"), [
    (b"", r"EOFError"),
    (b"\x80\x02}q\x00(U\x04data", r"data_batch_3 is not a readable CIFAR python batch"),
    (pickle.dumps([1, 2, 3]), r"holds a list, not a dict"),
    (pickle.dumps({b"labels": [0]}), r"no b'data' entry"),
    (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0, 1]}), r"\(2,\) labels do not match 1"),
])
def test_cifar10_damaged_batch_is_named(tmp_path: Path, content: bytes, reason: str) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _cifar10_tree(root)
    (root / "data_batch_3").write_bytes(content)
    with pytest.raises(DataError, match=reason) as err:
        read_cifar10(root)
    assert "data_batch_3" in str(err.value) and "\n" not in str(err.value)


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
