"""The project's side of its ClientApp: this node's data and the models of the run
configuration. What every DDOME client does (embed once, route, train, evaluate) is the
client toolkit, :mod:`ddome_strategy.client`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, Context
from torch import nn

from data.node_data import DataSpec, anchor_label_groups, check_node_folder, load_node_data, spec_from_run_config
from data.settings import load_partitioned, partition_settings
from ddome_strategy.client import ClientData, built_with
from ddome_strategy.models import Classifier, build_gate, build_model, generalist_hidden

if "OMP_NUM_THREADS" not in os.environ:
    # Simulated clients share the machine's cores, and small models run fastest on one
    # thread: two threads per client made local training ~10x slower on 2 cores.
    torch.set_num_threads(1)


@dataclass(kw_only=True)
class LocalData(ClientData):
    """One client's data (:class:`~ddome_strategy.client.ClientData`) and the shapes its
    models are built for."""

    input_shape: tuple[int, ...]
    num_classes: int


def load_local_data(cfg, partition_id: int, data_root: str) -> LocalData:
    """Load the partition ``partition_id`` (cached per process)."""
    return _local_data(str(cfg["dataset"]), data_root, tuple(sorted(partition_settings(cfg).items())), partition_id)


@lru_cache(maxsize=64)
def _local_data(dataset_name: str, data_root: str, settings: tuple, partition_id: int) -> LocalData:
    # Slicing the dataset copies the samples: keep a client's slices for later rounds.
    dataset, plan = load_partitioned(dataset_name, data_root, settings)
    train_idx = (
        torch.as_tensor(plan.train_indices[partition_id], dtype=torch.long)
        if partition_id < plan.num_train_clients
        else torch.zeros(0, dtype=torch.long)
    )
    eval_idx = torch.as_tensor(plan.eval_indices[partition_id], dtype=torch.long)
    eval_x, eval_y = (
        (dataset.train_x, dataset.train_y) if plan.eval_split == "train" else (dataset.test_x, dataset.test_y)
    )
    label_to_expert = {label: expert for expert in range(plan.num_experts) for label in plan.client_labels[expert]}
    return LocalData(
        train_x=dataset.train_x[train_idx],
        train_y=dataset.train_y[train_idx],
        eval_x=eval_x[eval_idx],
        eval_y=eval_y[eval_idx],
        label_to_expert=label_to_expert,
        input_shape=dataset.input_shape,
        num_classes=dataset.num_classes,
    )


def node_data(cfg, context: Context) -> LocalData:
    """This node's data: its own folder (node config ``data-path``, a deployment), else
    its partition of the simulation's dataset (node config ``partition-id``).

    With ``data-path`` nothing outside that folder is read: the run config's ``data-root``,
    if set, must name a folder inside it (:func:`data.node_data.resolve_node_path`
    refuses anything else).
    """
    data_path = context.node_config.get("data-path")
    if data_path is not None:
        return load_own_data(cfg, str(data_path), str(cfg.get("data-root", "")))
    data_root = str(context.node_config.get("data-root", cfg["data-root"]))
    return load_local_data(cfg, int(context.node_config["partition-id"]), data_root)


def load_own_data(cfg, data_path: str, subpath: str = "") -> LocalData:
    """Load a node's own folder with the run's :class:`~data.node_data.DataSpec` (cached per process).

    ``anchor-labels`` gives the routing error its label groups (else it is NaN).
    """
    spec = spec_from_run_config(cfg)
    groups = anchor_label_groups(str(cfg.get("anchor-labels", "")), int(cfg["num-experts"]), spec.num_classes)
    return _own_data(data_path, subpath, spec, tuple(sorted(groups.items())))


@lru_cache(maxsize=8)
def _own_data(data_path: str, subpath: str, spec: DataSpec, groups: tuple) -> LocalData:
    node = load_node_data(data_path, spec, subpath=subpath)
    return LocalData(
        train_x=node.train_x,
        train_y=node.train_y,
        eval_x=node.eval_x,
        eval_y=node.eval_y,
        label_to_expert=dict(groups),
        input_shape=node.input_shape,
        num_classes=node.num_classes,
    )


def build_expert(cfg, data: LocalData) -> Classifier:
    """An expert (or the common expert) of the configured architecture."""
    return build_model(str(cfg["arch"]), data.input_shape, data.num_classes, int(cfg["mlp-hidden"]))


def build_generalist(cfg, data: LocalData) -> Classifier:
    """The generalist: an expert with ``generalist-width`` of the hidden units."""
    hidden = generalist_hidden(int(cfg["mlp-hidden"]), float(cfg["generalist-width"]))
    return build_model(str(cfg["arch"]), data.input_shape, data.num_classes, hidden)


def build_local_gate(cfg, embedding_dim: int) -> nn.Module:
    """The gate of the configured width."""
    return build_gate(embedding_dim, int(cfg["num-experts"]) + bool(cfg["generalist"]), int(cfg["gate-hidden"]))


def expert_from(cfg, data: LocalData, record: ArrayRecord, prefix: str) -> Classifier:
    """An expert with the weights stored under ``prefix`` in ``record``."""
    return built_with(build_expert, record, prefix, cfg, data)


def check_node(context: Context) -> None:
    """A node with its own folder (node config ``data-path``) checks it when asked for its
    role: there, readable, in a known layout; and it must say who it is."""
    node = context.node_config
    if "data-path" in node:
        if "role" not in node and "partition-id" not in node:
            raise ValueError("node config has data-path but neither role nor partition-id.")
        check_node_folder(str(node["data-path"]))
