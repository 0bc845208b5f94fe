"""Dataset loading, on small files the tests write in torchvision's on-disk formats."""

import gzip
import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import datasets as tv

from data import load_dataset
from data.datasets import DEBIAN_FASHION_MNIST


@pytest.fixture(autouse=True)
def fresh_cache():
    load_dataset.cache_clear()
    yield
    load_dataset.cache_clear()


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """The IDX format of (Fashion-/E)MNIST: magic with dtype code and rank, big-endian dims."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    blob = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(blob)
    else:
        path.write_bytes(blob)


def fake_images(n, shape, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def check(dataset, n_train, n_test, shape, classes):
    assert dataset.train_x.shape == (n_train, *shape) and dataset.test_x.shape == (n_test, *shape)
    assert dataset.train_x.dtype == torch.float32 and dataset.train_y.dtype == torch.long
    assert dataset.input_shape == shape and dataset.num_classes == classes
    assert 0 <= int(dataset.train_y.min()) and int(dataset.train_y.max()) < classes
    # Normalised with the training split's statistics.
    assert abs(float(dataset.train_x.mean())) < 0.05 and abs(float(dataset.train_x.std()) - 1) < 0.05


@pytest.mark.parametrize("layout", ["plain-idx", "gz-idx", "torchvision"])
def test_fashion_mnist_from_a_data_root(tmp_path, layout):
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    for split, n in (("train", 40), ("t10k", 12)):
        x, y = fake_images(n, (28, 28), seed=n)
        write_idx(folder / f"{split}-images-idx3-ubyte", x, compress=layout == "gz-idx")
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, compress=layout == "gz-idx")
    dataset = load_dataset("fashion-mnist", str(tmp_path))
    check(dataset, 40, 12, (1, 28, 28), 10)
    assert dataset.train_y.tolist() == fake_images(40, (28, 28), seed=40)[1].tolist()


IDX_KINDS = ("images-idx3-ubyte", "labels-idx1-ubyte")


def test_parallel_first_loads_of_compressed_files_all_succeed(tmp_path, monkeypatch):
    # Benchmark workers start together on a fresh machine: each decompresses the IDX files
    # into the cache at once (a shared partial file made all but one of them fail).
    from concurrent.futures import ThreadPoolExecutor

    from data import datasets

    for split, n in (("train", 40), ("t10k", 12)):
        x, y = fake_images(n, (28, 28), seed=n)
        write_idx(tmp_path / "root" / f"{split}-images-idx3-ubyte", x, compress=True)
        write_idx(tmp_path / "root" / f"{split}-labels-idx1-ubyte", y, compress=True)
    for attempt in range(5):  # a race: several fresh caches make a miss unlikely
        cache = tmp_path / f"cache-{attempt}"
        monkeypatch.setattr(datasets, "DOWNLOAD_ROOT", cache)
        with ThreadPoolExecutor(8) as pool:
            loaded = list(pool.map(lambda _: datasets._load_fashion_mnist(str(tmp_path / "root")), range(8)))
        assert all(torch.equal(d.train_x, loaded[0].train_x) for d in loaded)
        cached = sorted(p.name for p in cache.rglob("*") if p.is_file())
        assert cached == sorted(f"{split}-{kind}" for split in ("train", "t10k") for kind in IDX_KINDS)


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_debian_package():
    check(load_dataset("fashion-mnist"), 60000, 10000, (1, 28, 28), 10)


def test_emnist_byclass_from_a_data_root(tmp_path):
    folder = tmp_path / "EMNIST" / "raw"
    for split, n in (("train", 30), ("test", 10)):
        x, y = fake_images(n, (28, 28), seed=n)
        write_idx(folder / f"emnist-byclass-{split}-images-idx3-ubyte", x)
        write_idx(folder / f"emnist-byclass-{split}-labels-idx1-ubyte", y)
    dataset = load_dataset("emnist", str(tmp_path))
    check(dataset, 30, 10, (1, 28, 28), 62)
    # Stored transposed, as in the EMNIST files: the loader flips them upright.
    raw = torch.as_tensor(fake_images(30, (28, 28), seed=30)[0], dtype=torch.float32)
    assert torch.corrcoef(torch.stack([dataset.train_x[0, 0].flatten(), raw[0].T.flatten()]))[0, 1] > 0.99


@pytest.mark.parametrize(("name", "cls", "classes"), [("cifar10", tv.CIFAR10, 10), ("cifar100", tv.CIFAR100, 100)])
def test_cifar_from_a_data_root(tmp_path, monkeypatch, name, cls, classes):
    folder = tmp_path / cls.base_folder
    folder.mkdir()
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def write(filename, n, seed):
        rng = np.random.default_rng(seed)
        batch = {
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: rng.integers(0, classes, n).tolist(),
        }
        (folder / filename).write_bytes(pickle.dumps(batch))
        return [filename, hashlib.md5((folder / filename).read_bytes()).hexdigest()]

    train_list = [write(f, 8, i) for i, (f, _) in enumerate(cls.train_list)]
    test_list = [write(f, 6, 99) for f, _ in cls.test_list]
    meta_key = cls.meta["key"]
    (folder / cls.meta["filename"]).write_bytes(pickle.dumps({meta_key: [f"c{i}" for i in range(classes)]}))
    meta = {**cls.meta, "md5": hashlib.md5((folder / cls.meta["filename"]).read_bytes()).hexdigest()}
    # torchvision verifies the official files' checksums (they are pickles); point it
    # at the checksums of the files this test wrote.
    monkeypatch.setattr(cls, "train_list", train_list)
    monkeypatch.setattr(cls, "test_list", test_list)
    monkeypatch.setattr(cls, "meta", meta)
    check(load_dataset(name, str(tmp_path)), 8 * len(train_list), 6, (3, 32, 32), classes)


def test_digits_loads_deterministically():
    a = load_dataset("digits")
    load_dataset.cache_clear()
    b = load_dataset("digits")
    check(a, 1347, 450, (1, 8, 8), 10)
    assert torch.equal(a.train_y, b.train_y)


def test_a_failed_download_names_the_root_and_the_offline_way(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tv.cifar, "download_and_extract_archive", offline)
    with pytest.raises(RuntimeError, match="download failed") as raised:
        load_dataset("cifar10", str(tmp_path))
    assert str(tmp_path) in str(raised.value) and "Offline" in str(raised.value)


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="mnist"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="data-root"):
        load_dataset("cifar10", str(tmp_path / "missing"))
