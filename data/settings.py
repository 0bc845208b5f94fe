"""Which run-config entries determine the data partition (shared by server and clients)."""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache

from .datasets import ArrayDataset, load_dataset
from .partition import PartitionPlan, make_partition


def partition_settings(cfg: Mapping) -> dict:
    """Keyword arguments of :func:`data.make_partition` taken from a run config."""
    return {
        "num_experts": int(cfg["num-experts"]),
        "num_train_clients": int(cfg["num-train-clients"]),
        "num_test_clients": int(cfg["num-test-clients"]),
        "labels_per_client": int(cfg["labels-per-client"]),
        "mode": str(cfg["partition-mode"]),
        "dirichlet_alpha": float(cfg["dirichlet-alpha"]),
        "dirichlet_anchors": str(cfg["dirichlet-anchors"]),
        "samples_per_client": int(cfg["samples-per-client"]),
        "eval_samples_per_client": int(cfg["eval-samples-per-client"]),
        "public_fraction": float(cfg["public-fraction"]),
        "validation_fraction": float(cfg["validation-fraction"]),
        "evaluation_split": str(cfg["evaluation-split"]),
        "seed": int(cfg["seed"]),
    }


def partitioned(cfg: Mapping, data_root: str | None = None) -> tuple[ArrayDataset, PartitionPlan]:
    """The dataset and its partition for a run config (loaded and cut once per process).

    ``data_root`` overrides the config's ``data-root`` (a SuperNode's own data folder).
    """
    root = str(cfg["data-root"]) if data_root is None else data_root
    return load_partitioned(str(cfg["dataset"]), root, tuple(sorted(partition_settings(cfg).items())))


@lru_cache(maxsize=4)
def load_partitioned(dataset_name: str, data_root: str, settings: tuple) -> tuple[ArrayDataset, PartitionPlan]:
    """Cached core of :func:`partitioned`; ``settings`` is ``partition_settings`` as sorted items."""
    dataset = load_dataset(dataset_name, data_root)
    plan = make_partition(
        dataset.train_y.numpy(), dataset.test_y.numpy(), num_classes=dataset.num_classes, **dict(settings)
    )
    return dataset, plan
