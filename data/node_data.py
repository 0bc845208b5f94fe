"""One SuperNode's own data, read from its own folder (never the whole dataset).

A node's folder holds its training and evaluation samples in one of two layouts:

* torchvision's ``ImageFolder`` layout: ``train/<class>/*.png`` and/or ``eval/<class>/*.png``,
  where ``<class>`` is a class name or a class index of the run's label space;
* NumPy archives: ``train.npz`` and/or ``eval.npz``, each with arrays ``x`` (``N x C x H x W``
  or ``N x H x W``, integer pixels or float intensities in [0, 1]) and ``y`` (labels: indices,
  or class names).

A test client holds only ``eval``. Every node normalises with the run's per-channel mean and
std (:class:`DataSpec`), exactly as :mod:`data.datasets` does for the simulation, so that a
node reading an export of a simulated partition sees the simulation's tensors.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LAYOUTS = ("imagefolder", "npz")
SPLITS = ("train", "eval")


class NodeDataError(ValueError):
    """A node's data folder that cannot be read; the message names the folder and the problem."""


def _floats(value, name: str) -> tuple[float, ...]:
    """Floats from a number, a sequence or a comma-separated string (Flower run configs hold scalars)."""
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, (int, float)):
        value = [value]
    try:
        floats = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numbers (e.g. '0.5' or '0.49,0.48,0.45'), got {value!r}.") from err
    if not floats:
        raise ValueError(f"{name} is empty.")
    return floats


@dataclass(frozen=True)
class DataSpec:
    """What every node of a run must agree on: label space, input shape and normalisation.

    Attributes
    ----------
    labels : tuple of str
        The label space: class ``i`` is named ``labels[i]`` (``"0".."C-1"`` when the run
        gives only a number of classes).
    mean, std : tuple of float
        Per-channel normalisation, applied to intensities in [0, 1]; their length is the
        number of channels.
    pixel_scale : float
        The integer pixel value of full intensity: integer inputs are divided by it first
        (255 for 8-bit images; 16 for scikit-learn's digits, as :mod:`data.datasets` does).
    input_shape : tuple of int, optional
        ``(channels, height, width)`` every sample must have; ``None``: not checked.
    """

    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_scale: float = 255.0
    input_shape: tuple[int, ...] | None = None

    @classmethod
    def make(cls, labels, mean, std, pixel_scale: float = 255.0, input_shape=None) -> DataSpec:
        """A spec from run-config values, checked.

        Parameters
        ----------
        labels : int, str or sequence of str
            A number of classes (folders then named ``0..C-1``), or the class names (a
            sequence, or one comma-separated string).
        mean, std : float, str or sequence of float
            Per-channel statistics (a comma-separated string is accepted: Flower's run
            config holds scalars only).
        pixel_scale : float (default: 255.0)
            Integer pixel value of full intensity.
        input_shape : str or sequence of int, optional
            ``(C, H, W)``, or ``"C,H,W"``.

        Returns
        -------
        DataSpec
        """
        if isinstance(labels, str) and labels.strip().isdigit():
            labels = int(labels)
        if isinstance(labels, int) and not isinstance(labels, bool):
            if labels < 1:
                raise ValueError(f"the label space needs at least one class, got {labels}.")
            names = tuple(str(i) for i in range(labels))
        else:
            names = tuple(s.strip() for s in (labels.split(",") if isinstance(labels, str) else labels))
            if not names or len(set(names)) != len(names) or not all(names):
                raise ValueError(f"class names must be distinct and non-empty, got {labels!r}.")
        mean, std = _floats(mean, "mean"), _floats(std, "std")
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}.")
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}.")
        if float(pixel_scale) <= 0:
            raise ValueError(f"pixel-scale must be positive, got {pixel_scale}.")
        shape = None
        if input_shape is not None and input_shape != "":
            shape = tuple(int(v) for v in _floats(input_shape, "input-shape"))
            if len(shape) != 3 or shape[0] != len(mean):
                raise ValueError(f"input-shape {shape} must be (channels, height, width) with {len(mean)} channels.")
        return cls(names, mean, std, float(pixel_scale), shape)

    @property
    def num_classes(self) -> int:
        """Size of the label space."""
        return len(self.labels)

    @property
    def channels(self) -> int:
        """Channels of a sample (the length of ``mean``)."""
        return len(self.mean)

    def label_index(self, name: str) -> int | None:
        """The run's index of a class folder name or npz label: a class name, else an index."""
        if name in self.labels:
            return self.labels.index(name)
        if name.isdigit() and int(name) < self.num_classes:
            return int(name)
        return None

    def describe_labels(self) -> str:
        """The label space, shortened for messages."""
        if self.labels == tuple(str(i) for i in range(self.num_classes)):
            return f"[0..{self.num_classes - 1}]"
        shown = ", ".join(repr(n) for n in self.labels[:12])
        return f"[{shown}{', ...' if self.num_classes > 12 else ''}]"

    def to_dict(self) -> dict:
        """JSON-ready form (the keys of an export's ``run-config.json``)."""
        plain = self.labels == tuple(str(i) for i in range(self.num_classes))
        return {
            "labels": self.num_classes if plain else list(self.labels),
            "num-classes": self.num_classes,
            "input-shape": list(self.input_shape) if self.input_shape else None,
            # float32 statistics are exact as Python floats, so the JSON round trip is lossless.
            "mean": list(self.mean),
            "std": list(self.std),
            "pixel-scale": self.pixel_scale,
        }

    @classmethod
    def from_dict(cls, values: Mapping) -> DataSpec:
        """Inverse of :meth:`to_dict` (extra keys are ignored)."""
        return cls.make(
            values["labels"], values["mean"], values["std"], values.get("pixel-scale", 255.0), values.get("input-shape")
        )

    @classmethod
    def from_json(cls, path: str | Path) -> DataSpec:
        """The spec stored in an export's ``run-config.json``."""
        with Path(path).open(encoding="utf-8") as handle:
            return cls.from_dict(json.load(handle))


@dataclass(frozen=True)
class NodeData:
    """One node's samples, normalised: inputs ``N x C x H x W`` (float32), labels ``N`` (int64).

    A split the node does not hold (a test client's ``train``) has zero samples.
    """

    path: Path
    layout: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """``(channels, height, width)`` of one sample."""
        return tuple(self.train_x.shape[1:])

    @property
    def train_labels(self) -> tuple[int, ...]:
        """The labels of the node's training samples, sorted."""
        return tuple(sorted(set(self.train_y.tolist())))


def resolve_node_path(data_root: str | Path, subpath: str | Path = "") -> Path:
    """The folder ``data_root/subpath``, refused unless it lies inside ``data_root``.

    ``data_root`` is the node's own folder (its node config); ``subpath`` may come from a
    run config, which the node does not control: absolute paths, ``..`` and symlinks
    leading out of ``data_root`` are refused.

    Parameters
    ----------
    data_root : str or Path
        The node's data folder.
    subpath : str or Path (default: "")
        A folder relative to ``data_root``.

    Returns
    -------
    Path
        The resolved folder (symlinks followed).

    Raises
    ------
    NodeDataError
        If ``data_root`` is missing or not a folder, or ``subpath`` escapes it.
    """
    if not str(data_root):
        raise NodeDataError("no data folder given for this node (set data-path in its node config).")
    shown = Path(data_root).expanduser()
    root = shown.resolve()
    if not root.exists():
        raise NodeDataError(f"data folder {shown}: the folder does not exist.")
    if not root.is_dir():
        raise NodeDataError(f"data folder {shown}: not a folder.")
    sub = Path(subpath)
    if sub.is_absolute():
        raise NodeDataError(
            f"data folder {shown}: {str(subpath)!r} is an absolute path; only paths inside the node's folder."
        )
    target = (root / sub).resolve()
    if not target.is_relative_to(root):
        raise NodeDataError(f"data folder {shown}: {str(subpath)!r} leads outside the node's folder.")
    if not target.exists():
        raise NodeDataError(f"data folder {shown / sub}: the folder does not exist.")
    if not target.is_dir():
        raise NodeDataError(f"data folder {shown / sub}: not a folder.")
    return target


class _Reader:
    """Reads one node's splits; ``shown`` is the path as the user gave it, for messages."""

    def __init__(self, root: Path, shown: Path, spec: DataSpec) -> None:
        self.root, self.shown, self.spec = root, shown, spec

    def fail(self, problem: str) -> NodeDataError:
        return NodeDataError(f"data folder {self.shown}: {problem}")

    def inside(self, path: Path) -> Path:
        # A symlink inside the folder must not expose files outside it.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root):
            raise self.fail(f"{path.relative_to(self.root)} links outside the node's folder.")
        return resolved

    def foreign(self, label) -> NodeDataError:
        return NodeDataError(
            f"data folder {self.shown} holds label {label!r} which is not in the run's label space "
            f"{self.spec.describe_labels()}."
        )

    def check_shape(self, shape: tuple[int, ...], source: str) -> None:
        expected = self.spec.input_shape
        if shape[0] != self.spec.channels:
            raise self.fail(f"{source} has {shape[0]} channels, the run's normalisation has {self.spec.channels}.")
        if expected is not None and tuple(shape) != tuple(expected):
            raise self.fail(
                f"{source} holds {'x'.join(map(str, shape))} samples, the run's input shape is "
                f"{'x'.join(map(str, expected))}."
            )

    def normalise(self, x: np.ndarray | torch.Tensor, source: str) -> torch.Tensor:
        x = torch.as_tensor(x)
        if x.dtype == torch.bool or x.is_complex():
            raise self.fail(f"{source} holds {x.dtype} inputs; expected integer pixels or float intensities.")
        # The operations of data.datasets (_images, then _normalise), for identical tensors.
        x = x.to(torch.float32) / self.spec.pixel_scale if not x.is_floating_point() else x.to(torch.float32)
        shape = (1, self.spec.channels, 1, 1)
        mean = torch.tensor(self.spec.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.spec.std, dtype=torch.float32).view(shape)
        return (x - mean) / std

    def npz(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        source = f"{split}.npz"
        path = self.inside(self.root / source)
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise self.fail(f"{source} is a single array, not an archive with arrays x and y.")
            with archive:
                missing = [k for k in ("x", "y") if k not in archive.files]
                if missing:
                    raise self.fail(f"{source} has no array {missing[0]!r} (it holds {sorted(archive.files)}).")
                x, y = archive["x"], archive["y"]
        except NodeDataError:
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
            raise self.fail(f"cannot read {source} ({err}).") from err
        if y.ndim != 1:
            raise self.fail(f"{source}: y must be one label per sample, got shape {y.shape}.")
        if x.ndim not in (3, 4):
            raise self.fail(f"{source}: x must be N x C x H x W or N x H x W, got shape {x.shape}.")
        if len(x) != len(y):
            raise self.fail(f"{source} holds {len(x)} inputs but {len(y)} labels.")
        if x.ndim == 3:
            x = x[:, None]
        self.check_shape(tuple(x.shape[1:]), source)
        return self.normalise(x, source), self.labels(y, source)

    def labels(self, y: np.ndarray, source: str) -> torch.Tensor:
        if y.dtype.kind in "US":  # class names
            names = y.astype(str)
            index = {name: self.spec.label_index(name) for name in np.unique(names)}
            bad = [name for name, i in index.items() if i is None]
            if bad:
                raise self.foreign(bad[0])
            return torch.as_tensor([index[n] for n in names], dtype=torch.long)
        if y.dtype.kind not in "iu":
            raise self.fail(f"{source}: y must hold integer labels or class names, got {y.dtype}.")
        bad = y[(y < 0) | (y >= self.spec.num_classes)]
        if len(bad):
            raise self.foreign(int(bad[0]))
        return torch.as_tensor(y.astype(np.int64))

    def image_folder(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import PILToTensor

        folder = self.root / split
        self.inside(folder)
        mode = {1: "L", 3: "RGB"}.get(self.spec.channels)
        if mode is None:
            raise self.fail(f"{split}/ holds images, which have 1 or 3 channels, not {self.spec.channels}.")

        def load(path: str):
            with Image.open(path) as image:
                return image.convert(mode)

        try:
            images = ImageFolder(str(folder), loader=load, transform=PILToTensor(), allow_empty=True)
        except FileNotFoundError as err:
            raise self.fail(f"{split}/ holds no class folders ({err}).") from err
        # The run's index of each class folder, not ImageFolder's alphabetical one: a node
        # holding only some classes would otherwise relabel them 0, 1, ...
        run_index = []
        for name in images.classes:
            index = self.spec.label_index(name)
            if index is None:
                raise self.foreign(name)
            run_index.append(index)
        if not images.samples:
            raise self.fail(f"{split}/ holds no images (readable: {', '.join(sorted(images.extensions))}).")
        # File names order the samples across classes (an export's order, the simulation's).
        images.samples.sort(key=lambda item: (Path(item[0]).name, item[0]))
        xs, ys = [], []
        for i, (path, class_index) in enumerate(images.samples):
            relative = Path(path).relative_to(self.root)
            self.inside(Path(path))
            try:
                x, _ = images[i]
            except OSError as err:  # PIL's UnidentifiedImageError included
                raise self.fail(f"cannot read image {relative} ({err}).") from err
            if xs and x.shape != xs[0].shape:
                raise self.fail(
                    f"image {relative} is {'x'.join(map(str, x.shape))}, the others {'x'.join(map(str, xs[0].shape))}."
                )
            xs.append(x)
            ys.append(run_index[class_index])
        self.check_shape(tuple(xs[0].shape), f"{split}/")
        return self.normalise(torch.stack(xs), f"{split}/"), torch.as_tensor(ys, dtype=torch.long)


def detect_layout(folder: Path, shown: Path | None = None) -> str:
    """``"imagefolder"`` or ``"npz"``: the layout of a node's folder.

    Raises
    ------
    NodeDataError
        If the folder is empty, holds neither layout, or both.
    """
    shown = shown or folder
    if not any(folder.iterdir()):
        raise NodeDataError(f"data folder {shown}: the folder is empty.")
    has_folders = any((folder / s).is_dir() for s in SPLITS)
    has_npz = any((folder / f"{s}.npz").is_file() for s in SPLITS)
    if has_folders and has_npz:
        raise NodeDataError(f"data folder {shown}: holds both train/eval folders and .npz files; keep one layout.")
    if not (has_folders or has_npz):
        raise NodeDataError(
            f"data folder {shown}: no recognised layout; expected train/ and/or eval/ with one sub-folder per "
            "class (torchvision ImageFolder), or train.npz and/or eval.npz with arrays x and y."
        )
    return "imagefolder" if has_folders else "npz"


def check_node_folder(data_root: str | Path, subpath: str | Path = "") -> str:
    """The layout of a node's folder, checked without reading its samples (a node's
    answer to the role query: a missing, empty or unrecognised folder is reported before
    the first round).

    Raises
    ------
    NodeDataError
        As :func:`load_node_data` for a missing or empty folder or an unknown layout.
    """
    folder = resolve_node_path(data_root, subpath)
    return detect_layout(folder, Path(data_root).expanduser() / subpath)


def load_node_data(data_root: str | Path, spec: DataSpec, *, subpath: str | Path = "") -> NodeData:
    """Read one node's own data folder, normalised with the run's statistics.

    Parameters
    ----------
    data_root : str or Path
        The node's own data folder (from its node config); nothing outside it is read.
    spec : DataSpec
        The run's label space, normalisation and (optionally) input shape.
    subpath : str or Path (default: "")
        A folder inside ``data_root`` to read instead (e.g. from the run config);
        refused if it leads outside ``data_root``.

    Returns
    -------
    NodeData
        Both splits; a split the folder lacks has zero samples.

    Raises
    ------
    NodeDataError
        One sentence naming the node's folder: missing or empty folder, no recognised
        layout, a label outside the label space, mismatched or misshapen arrays, an
        unreadable file, or a path leading outside ``data_root``.
    """
    folder = resolve_node_path(data_root, subpath)
    shown = Path(data_root).expanduser() / subpath
    layout = detect_layout(folder, shown)
    reader = _Reader(folder, shown, spec)
    splits = {}
    for split in SPLITS:
        present = (folder / split).is_dir() if layout == "imagefolder" else (folder / f"{split}.npz").is_file()
        if present:
            splits[split] = reader.image_folder(split) if layout == "imagefolder" else reader.npz(split)
    shapes = {tuple(x.shape[1:]) for x, _ in splits.values()}
    if len(shapes) > 1:
        raise NodeDataError(f"data folder {shown}: train and eval samples have different shapes {sorted(shapes)}.")
    shape = shapes.pop() if shapes else spec.input_shape
    empty = (torch.zeros((0, *shape), dtype=torch.float32), torch.zeros(0, dtype=torch.long))
    (train_x, train_y), (eval_x, eval_y) = (splits.get(s, empty) for s in SPLITS)
    return NodeData(Path(folder), layout, train_x, train_y, eval_x, eval_y, spec.num_classes)


def spec_from_run_config(cfg: Mapping) -> DataSpec:
    """The :class:`DataSpec` of a run on node-local data, from its run config.

    Keys ``labels`` (a number of classes or comma-separated class names), ``input-mean``
    and ``input-std`` (comma-separated per-channel statistics), ``pixel-scale`` and
    ``input-shape`` (``"C,H,W"``, optional). ``python -m data.export`` writes them.

    Raises
    ------
    ValueError
        One sentence naming the key that is missing or invalid.
    """
    missing = [k for k in ("labels", "input-mean", "input-std") if str(cfg.get(k, "")).strip() == ""]
    if missing:
        raise ValueError(
            f"{missing[0]} is not set: a run on node-local data needs labels, input-mean and input-std "
            "(python -m data.export writes them to run-config.toml)."
        )
    try:
        return DataSpec.make(
            cfg["labels"], cfg["input-mean"], cfg["input-std"], cfg.get("pixel-scale", 255.0), cfg.get("input-shape")
        )
    except ValueError as err:
        raise ValueError(f"labels/input-shape/input-mean/input-std/pixel-scale: {err}") from err


def anchor_label_groups(text: str, num_experts: int, num_classes: int | None = None) -> dict[int, int]:
    """Label -> anchor expert from ``anchor-labels`` (``"0,9;2,8;..."``: expert ``i``'s labels).

    Empty text gives an empty mapping (the routing error is then NaN).
    """
    if not str(text).strip():
        return {}
    groups = [g for g in str(text).replace(" ", "").split(";")]
    if len(groups) != num_experts:
        raise ValueError(f"anchor-labels has {len(groups)} groups, one per expert is needed ({num_experts}).")
    mapping: dict[int, int] = {}
    for expert, group in enumerate(groups):
        for item in filter(None, group.split(",")):
            if not item.isdigit() or (num_classes is not None and int(item) >= num_classes):
                raise ValueError(f"anchor-labels: {item!r} is not a class index of the label space.")
            if int(item) in mapping:
                raise ValueError(f"anchor-labels: label {item} is in two groups.")
            mapping[int(item)] = expert
    return mapping
