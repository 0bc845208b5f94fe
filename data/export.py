"""Write a run's partition as one data folder per SuperNode, for a real deployment.

``python -m data.export --config-file configs/digits-tiny.yaml --out DIR [--format npz|imagefolder]``
writes ``DIR/node-<pid>/`` (only that partition's samples, in a layout
:func:`data.node_data.load_node_data` reads), ``DIR/public/`` (the public split, for the
server's common expert), ``DIR/nodes.json`` (each node's folder, role, expert and the
``--node-config`` of its ``flower-supernode``), ``DIR/run-config.json`` (the label space,
input shape and normalisation every node must use) and ``DIR/run-config.toml`` (the
``flwr run --run-config`` file of a deployment on these folders).

Samples are stored as the dataset's integer pixels (recovered from the normalised tensors
and checked), so a node loading its folder gets the simulation's tensors.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .datasets import ArrayDataset
from .node_data import LAYOUTS, DataSpec
from .partition import PartitionPlan
from .settings import partitioned

# Integer pixel value of full intensity in each dataset's files (data.datasets divides by it).
PIXEL_SCALE = {"digits": 16.0}
# Recovered pixels must give back the simulation's tensors to this tolerance.
ROUND_TRIP_ATOL = 1e-5


@dataclass(frozen=True)
class RawImages:
    """A dataset's integer pixels (``uint8``, ``N x C x H x W``) and the spec that normalises them."""

    train_x: np.ndarray
    test_x: np.ndarray
    spec: DataSpec


def raw_images(dataset: ArrayDataset, name: str) -> RawImages:
    """Recover the integer pixels behind a dataset's normalised tensors.

    :mod:`data.datasets` keeps only ``(pixel / scale - mean) / std``; every dataset has
    black and full-intensity pixels in each channel of its training split, which pins down
    ``mean`` and ``std``, so rounding recovers the pixels. The result is checked: the
    statistics recomputed as ``data.datasets`` does must give back the tensors.

    Parameters
    ----------
    dataset : ArrayDataset
        The loaded dataset.
    name : str
        Its name (for its pixel scale).

    Returns
    -------
    RawImages

    Raises
    ------
    RuntimeError
        If the pixels cannot be recovered exactly.
    """
    scale = PIXEL_SCALE.get(name, 255.0)
    dims = (0, 2, 3)
    low, high = dataset.train_x.amin(dims, keepdim=True).double(), dataset.train_x.amax(dims, keepdim=True).double()
    step = (high - low).clamp_min(1e-12) / scale  # one pixel level, in normalised units

    def pixels(z: torch.Tensor) -> torch.Tensor:
        return ((z.double() - low) / step).round().clamp(0, scale).to(torch.uint8)

    train, test = pixels(dataset.train_x), pixels(dataset.test_x)
    # data.datasets' _images and _normalise on the recovered pixels.
    x = train.to(torch.float32) / scale
    mean, std = x.mean(dims, keepdim=True), x.std(dims, keepdim=True).clamp_min(1e-6)
    for raw, target, split in ((train, dataset.train_x, "train"), (test, dataset.test_x, "test")):
        error = ((raw.to(torch.float32) / scale - mean) / std - target).abs().max().item() if len(raw) else 0.0
        if error > ROUND_TRIP_ATOL:
            raise RuntimeError(f"cannot recover the {name} {split} pixels exactly (max error {error:.2e}).")
    spec = DataSpec.make(
        dataset.num_classes, mean.flatten().tolist(), std.flatten().tolist(), scale, dataset.input_shape
    )
    return RawImages(train.numpy(), test.numpy(), spec)


def _write_split(folder: Path, split: str, x: np.ndarray, y: np.ndarray, fmt: str) -> None:
    if len(x) == 0:  # an absent split reads back as empty
        return
    if fmt == "npz":
        np.savez_compressed(folder / f"{split}.npz", x=x, y=y.astype(np.int64))
        return
    from PIL import Image

    width = max(6, len(str(len(x) - 1)))
    for label in np.unique(y):
        (folder / split / str(int(label))).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(x, y)):
        # Zero-padded positions: the loader orders samples by file name, keeping this order.
        array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        Image.fromarray(array).save(folder / split / str(int(label)) / f"{i:0{width}d}.png")


def node_config(path: Path, role: str, expert: int | None, partition_id: int | None = None) -> str:
    """The ``--node-config`` value of a node's ``flower-supernode``."""
    config = f"data-path='{path}' role='{role}'"
    config += f" expert={expert}" if expert is not None else ""
    return config + (f" partition-id={partition_id}" if partition_id is not None else "")


# Run-config keys that name the exporting machine's files or the run's bookkeeping: a
# deployment's run config leaves them to the submitter.
NOT_EXPORTED = ("config-file", "data-root", "output-dir", "cache-dir", "resume", "verbose")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def deployment_run_config(cfg: Mapping, spec: DataSpec, plan: PartitionPlan, public: Path) -> dict:
    """The run-config overrides of ``flwr run`` for an export: the partition's settings,
    the DataSpec (``labels``, ``input-shape``, ``input-mean``, ``input-std``,
    ``pixel-scale``), the anchors' label groups (``anchor-labels``, for the routing
    error) and the public folder (``public-data-path``, on the SuperLink host)."""
    values = {k: v for k, v in cfg.items() if k not in NOT_EXPORTED}
    # repr of a float32 statistic is exact, so the nodes normalise as the simulation did.
    values.update(
        {
            "labels": ",".join(spec.labels)
            if spec.labels != tuple(map(str, range(spec.num_classes)))
            else str(spec.num_classes),
            "input-shape": ",".join(map(str, spec.input_shape or ())),
            "input-mean": ",".join(repr(v) for v in spec.mean),
            "input-std": ",".join(repr(v) for v in spec.std),
            "pixel-scale": float(spec.pixel_scale),
            "anchor-labels": ";".join(
                ",".join(str(int(v)) for v in plan.client_labels[e]) for e in range(plan.num_experts)
            ),
            "public-data-path": str(public),
        }
    )
    return values


def export_partition(
    cfg: Mapping,
    out: str | Path,
    fmt: str = "npz",
    data: tuple[ArrayDataset, PartitionPlan] | None = None,
    server_public_path: str | None = None,
) -> list[dict]:
    """Write one folder per node, the public split, ``nodes.json`` and ``run-config.json``.

    Parameters
    ----------
    cfg : Mapping
        A resolved run config (:func:`server_app.config.resolve`).
    out : str or Path
        Output folder; created, and must be empty if it exists.
    fmt : str (default: "npz")
        ``"npz"`` or ``"imagefolder"`` (PNG files).
    data : tuple, optional
        The dataset and plan of ``cfg`` (default: :func:`data.settings.partitioned`).
    server_public_path : str, optional
        Where ``public/`` will be on the SuperLink host (``public-data-path`` of
        ``run-config.toml``; default: the exported folder itself).

    Returns
    -------
    list of dict
        The entries of ``nodes.json``.
    """
    if fmt not in LAYOUTS:
        raise ValueError(f"format {fmt!r} is not one of {', '.join(LAYOUTS)}.")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out.")
    dataset, plan = data if data is not None else partitioned(cfg)
    raw = raw_images(dataset, str(cfg["dataset"]))
    train_y, test_y = dataset.train_y.numpy(), dataset.test_y.numpy()
    eval_x, eval_y = (raw.train_x, train_y) if plan.eval_split == "train" else (raw.test_x, test_y)
    out.mkdir(parents=True, exist_ok=True)

    nodes = []
    for pid in range(plan.num_partitions):
        role = plan.role(pid)
        folder = out / f"node-{pid}"
        folder.mkdir()
        train_idx = plan.train_indices[pid] if pid < plan.num_train_clients else np.zeros(0, dtype=np.int64)
        eval_idx = plan.eval_indices[pid]
        _write_split(folder, "train", raw.train_x[train_idx], train_y[train_idx], fmt)
        _write_split(folder, "eval", eval_x[eval_idx], eval_y[eval_idx], fmt)
        expert = pid if role == "anchor" else None
        nodes.append(
            {
                "partition-id": pid,
                "folder": folder.name,
                "path": str(folder),
                "role": role,
                "expert": expert,
                "labels": [int(v) for v in plan.client_labels[pid]],
                "num-train": len(train_idx),
                "num-eval": len(eval_idx),
                "node-config": node_config(folder, role, expert, pid),
            }
        )
    public = out / "public"
    public.mkdir()
    _write_split(public, "train", raw.train_x[plan.public_indices], train_y[plan.public_indices], fmt)

    run_config = {
        "dataset": str(cfg["dataset"]),
        "format": fmt,
        **raw.spec.to_dict(),
        "eval-split": plan.eval_split,
        "num-experts": plan.num_experts,
        "num-train-clients": plan.num_train_clients,
        "num-test-clients": plan.num_test_clients,
        "public": {"folder": public.name, "path": str(public), "num-train": len(plan.public_indices)},
        "run-config": dict(cfg),
    }
    deployment = deployment_run_config(cfg, raw.spec, plan, Path(server_public_path or public))
    run_config["deployment-run-config"] = deployment
    lines = [
        f"# flwr run . <federation> --run-config {out / 'run-config.toml'}",
        "# The run config of this export on node-local data (docs/deploy.md). public-data-path is the",
        "# public folder on the SuperLink host: change it if you copy public/ elsewhere.",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in deployment.items()]
    (out / "run-config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "nodes.json").write_text(json.dumps(nodes, indent=2) + "\n", encoding="utf-8")
    (out / "run-config.json").write_text(json.dumps(run_config, indent=2) + "\n", encoding="utf-8")
    return nodes


def _value(text: str):
    """A ``--run-config`` value as Flower reads it (TOML), or the bare text as a string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: resolve the run config, export, print where the node list is."""
    from server_app.config import ConfigError, resolve

    parser = argparse.ArgumentParser(prog="python -m data.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", default="", help="YAML preset (as the run config's config-file)")
    parser.add_argument("--run-config", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides")
    parser.add_argument("--out", required=True, help="output folder (new or empty)")
    parser.add_argument("--format", choices=LAYOUTS, default="npz", help="node folder layout (default: npz)")
    parser.add_argument(
        "--server-public-path",
        default=None,
        help="where public/ will be on the SuperLink host (run-config.toml's public-data-path; default: OUT/public)",
    )
    args = parser.parse_args(argv)
    explicit = {"config-file": args.config_file} if args.config_file else {}
    for item in args.run_config:
        key, sep, text = item.partition("=")
        if not sep:
            parser.error(f"--run-config {item!r} is not KEY=VALUE.")
        explicit[key.strip()] = _value(text.strip())
    try:
        cfg = resolve(explicit, explicit)
        nodes = export_partition(cfg, args.out, args.format, server_public_path=args.server_public_path)
    except (ConfigError, ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1
    out = Path(args.out).expanduser().resolve()
    print(f"{len(nodes)} node folders, public/, nodes.json, run-config.json and run-config.toml written to {out}")
    print(f"Submit with: flwr run . <federation> --run-config {out / 'run-config.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
