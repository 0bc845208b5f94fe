"""Datasets as in-memory tensors: Fashion-MNIST, CIFAR-10/100, EMNIST, digits."""

from __future__ import annotations

import gzip
import hashlib
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ddome_strategy.common_expert import write_atomically

DATASETS = ("fashion-mnist", "cifar10", "cifar100", "emnist", "digits")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DOWNLOAD_ROOT = Path("~/.cache/ddome/data").expanduser()
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class ArrayDataset:
    """A labelled dataset held as tensors: inputs ``N x C x H x W``, labels ``N``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, height, width)`` of one sample."""
        return tuple(self.train_x.shape[1:])


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Per-channel statistics of the training split, applied to both splits.
    dims = (0, 2, 3)
    mean, std = train.mean(dims, keepdim=True), train.std(dims, keepdim=True).clamp_min(1e-6)
    return (train - mean) / std, (test - mean) / std


def _images(array, channels_last: bool = False) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(array), dtype=torch.float32) / 255.0
    if channels_last:  # N x H x W x C -> N x C x H x W
        return x.permute(0, 3, 1, 2).contiguous()
    return x.unsqueeze(1)  # N x H x W -> N x 1 x H x W


def _build(train_x, train_y, test_x, test_y, num_classes: int) -> ArrayDataset:
    train_x, test_x = _normalise(train_x, test_x)
    return ArrayDataset(
        train_x,
        torch.as_tensor(np.asarray(train_y), dtype=torch.long),
        test_x,
        torch.as_tensor(np.asarray(test_y), dtype=torch.long),
        num_classes,
    )


def _fashion_raw_dir(root: str) -> Path | None:
    """A folder holding the four Fashion-MNIST IDX files (plain or gzipped), if any."""
    candidates = [Path(root), Path(root) / "FashionMNIST" / "raw"] if root else [DEBIAN_FASHION_MNIST]
    for folder in candidates:
        if all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in FASHION_FILES):
            return folder
    return None


def _load_fashion_mnist(root: str) -> ArrayDataset:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder = _fashion_raw_dir(root)
    if folder is None:
        download_root = Path(root) if root else DOWNLOAD_ROOT
        try:
            FashionMNIST(str(download_root), train=True, download=True)
        except Exception as err:  # noqa: BLE001 - any download failure means the same
            raise RuntimeError(
                f"Fashion-MNIST not found in {download_root} and the download failed ({err}). "
                "Offline, install Debian's dataset-fashion-mnist or put the four IDX files in data-root."
            ) from err
        folder = download_root / "FashionMNIST" / "raw"

    def read(name: str, reader):
        plain = folder / name
        if plain.exists():
            return reader(str(plain))
        # torchvision's readers take uncompressed files: decompress into the cache,
        # keyed by the source file so that different data roots never mix.
        source = folder / f"{name}.gz"
        stat = source.stat()
        key = hashlib.sha256(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
        target = DOWNLOAD_ROOT / "fashion-mnist" / key / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Parallel first runs (benchmark workers) each decompress; the last rename wins.
            with gzip.open(source, "rb") as src:
                write_atomically(target, lambda dst: shutil.copyfileobj(src, dst))
        return reader(str(target))

    images = [read(name, read_image_file) for name in FASHION_FILES[::2]]
    labels = [read(name, read_label_file) for name in FASHION_FILES[1::2]]
    return _build(_images(images[0]), labels[0], _images(images[1]), labels[1], 10)


def _torchvision(name: str, root: str) -> ArrayDataset:
    from torchvision import datasets

    folder = Path(root) if root else DOWNLOAD_ROOT

    def split(train: bool):
        kwargs = {"split": "byclass"} if name == "emnist" else {}
        cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "emnist": datasets.EMNIST}[name]
        try:
            return cls(str(folder), train=train, download=False, **kwargs)
        except RuntimeError:
            try:
                return cls(str(folder), train=train, download=True, **kwargs)
            except Exception as err:  # noqa: BLE001
                raise RuntimeError(
                    f"{name} not found in {folder} and the download failed ({err}). Offline, "
                    f"put torchvision's {cls.__name__} files in data-root."
                ) from err

    train, test = split(True), split(False)
    if name == "emnist":
        # torchvision keeps EMNIST images transposed (as stored in the IDX files).
        to_x = lambda d: _images(d.data.transpose(1, 2))  # noqa: E731
        return _build(to_x(train), train.targets, to_x(test), test.targets, len(train.classes))
    return _build(
        _images(train.data, channels_last=True),
        train.targets,
        _images(test.data, channels_last=True),
        test.targets,
        len(train.classes),
    )


def _load_digits() -> ArrayDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    return _build(x_train, y_train, x_test, y_test, 10)


@lru_cache(maxsize=4)
def load_dataset(name: str, root: str = "") -> ArrayDataset:
    """Load a dataset into memory (once per process).

    Parameters
    ----------
    name : str
        One of :data:`DATASETS`.
    root : str (default: "")
        Folder with the dataset files in torchvision's layout (or, for Fashion-MNIST,
        the IDX files themselves). Empty: Debian's Fashion-MNIST package if present,
        else a download into ``~/.cache/ddome/data``.

    Returns
    -------
    ArrayDataset
        Normalised float inputs and integer labels of both splits.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {', '.join(DATASETS)}.")
    if root and not Path(root).expanduser().exists():
        raise FileNotFoundError(f"data-root {root!r} does not exist.")
    root = str(Path(root).expanduser()) if root else ""
    if name == "digits":
        return _load_digits()
    if name == "fashion-mnist":
        return _load_fashion_mnist(root)
    return _torchvision(name, root)
