"""Datasets and the paper's client partitions."""

from .datasets import DATASETS, ArrayDataset, load_dataset
from .partition import DIRICHLET_ANCHORS, EVALUATION_SPLITS, PARTITION_MODES, PartitionPlan, make_partition

__all__ = [
    "DATASETS",
    "DIRICHLET_ANCHORS",
    "EVALUATION_SPLITS",
    "PARTITION_MODES",
    "ArrayDataset",
    "PartitionPlan",
    "load_dataset",
    "make_partition",
]
