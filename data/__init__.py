"""Datasets and the paper's client partitions."""

from .datasets import DATASETS, ArrayDataset, load_dataset
from .partition import EVALUATION_SPLITS, PARTITION_MODES, PartitionPlan, make_partition

__all__ = [
    "DATASETS",
    "EVALUATION_SPLITS",
    "PARTITION_MODES",
    "ArrayDataset",
    "PartitionPlan",
    "load_dataset",
    "make_partition",
]
