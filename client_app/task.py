"""What a DDOME client does locally: embed once, score, train, evaluate zero-shot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from torch import nn

from data.node_data import DataSpec, anchor_label_groups, load_node_data, spec_from_run_config
from data.settings import load_partitioned, partition_settings
from ddome_strategy.arrays import GATE_PREFIX, load_part
from ddome_strategy.models import Classifier, build_gate, build_model, pick_device
from ddome_strategy.moe import (
    ZERO_SHOT_RULES,
    anchor_loss,
    confident_predictions,
    fallback_predictions,
    mixture_loss,
    routing_error,
    zero_shot_predictions,
)
from ddome_strategy.protocol import CLIENT_CONFIG, CONFIG, check_version

if "OMP_NUM_THREADS" not in os.environ:
    # Simulated clients share the machine's cores, and small models run fastest on one
    # thread: two threads per client made local training ~10x slower on 2 cores.
    torch.set_num_threads(1)


def settings(message: Message, context: Context) -> dict:
    """The run's client configuration with this message's per-round values.

    The client configuration comes with the node's first message (record
    ``client-config``) and is kept in ``context.state`` for the rest of the run; later
    messages carry only per-round values (record ``config``).
    """
    if CLIENT_CONFIG in message.content:
        check_version(message.content[CLIENT_CONFIG])  # another major version: an error reply
        context.state[CLIENT_CONFIG] = message.content[CLIENT_CONFIG]
    if CLIENT_CONFIG not in context.state:
        raise RuntimeError("No client configuration on this node and none in the message: the server must resend it.")
    return {**context.state[CLIENT_CONFIG], **message.content.config_records.get(CONFIG, ConfigRecord())}


@dataclass
class LocalData:
    """One client's data: raw inputs for the experts, embeddings for the gate."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    label_to_expert: dict[int, int]


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
        dataset.train_x[train_idx],
        dataset.train_y[train_idx],
        eval_x[eval_idx],
        eval_y[eval_idx],
        dataset.input_shape,
        dataset.num_classes,
        label_to_expert,
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


def node_seed(cfg, context: Context) -> int:
    """Seed of this node's local shuffling in this round: from its ``partition-id`` (the
    simulation's, reproducible), else from its node id (a deployed node may have none)."""
    own = context.node_config.get("partition-id", context.node_id % 1_000_003)
    return int(cfg["seed"]) * 100_003 + int(cfg["server-round"]) * 1009 + int(own)


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
        node.train_x, node.train_y, node.eval_x, node.eval_y, node.input_shape, node.num_classes, dict(groups)
    )


def build_expert(cfg, data: LocalData) -> Classifier:
    """An expert (or the common expert) of the configured architecture."""
    return build_model(str(cfg["arch"]), data.input_shape, data.num_classes, int(cfg["mlp-hidden"]))


def build_local_gate(cfg, embedding_dim: int) -> nn.Module:
    """The gate of the configured width."""
    return build_gate(embedding_dim, int(cfg["num-experts"]), int(cfg["gate-hidden"]))


def expert_from(cfg, data: LocalData, record: ArrayRecord, prefix: str) -> Classifier:
    """An expert with the weights stored under ``prefix`` in ``record``."""
    with torch.device("meta"):  # no random initialisation: the weights come next
        model = build_expert(cfg, data)
    load_part(model, record, prefix, assign=True)
    return model


def gate_from(cfg, embedding_dim: int, record: ArrayRecord) -> nn.Module:
    """The gate with the weights stored in ``record``."""
    with torch.device("meta"):
        gate = build_local_gate(cfg, embedding_dim)
    load_part(gate, record, GATE_PREFIX, assign=True)
    return gate


def inference_batch(device: torch.device) -> int:
    """Samples per forward pass when only predicting: on the CPU, 128 keeps a CNN's
    activations in cache (2x faster than 1024, docs/performance.md); GPUs want more."""
    return 1024 if device.type == "cuda" else 128


@torch.no_grad()
def embed(common_expert: Classifier, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Common-expert embeddings of ``x``, computed once per client."""
    device = pick_device()
    batch = batch or inference_batch(device)
    common_expert.to(device).eval()
    if len(x) == 0:
        return torch.zeros(0, common_expert.feature_dim)
    return torch.cat([common_expert.embed(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x``, in batches."""
    device = pick_device()
    batch = batch or inference_batch(device)
    model.to(device).eval()
    return torch.cat([model(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


@torch.no_grad()
def mean_gate_scores(gate: nn.Module, embeddings: torch.Tensor) -> np.ndarray:
    """The routing reply: gate probabilities averaged over the local data."""
    return torch.softmax(predict(gate, embeddings), dim=1).mean(0).double().numpy()


def _batches(n: int, batch_size: int, seed: int):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def train_local(
    cfg,
    gate: nn.Module,
    experts: dict[int, nn.Module],
    x: torch.Tensor,
    embeddings: torch.Tensor,
    y: torch.Tensor,
    anchor_expert: int | None,
    seed: int,
) -> float:
    """Train the gate and the received experts jointly; return the mean loss.

    A normal client minimises the mixture cross-entropy over its K experts; an anchor
    (``anchor_expert`` set) its expert's cross-entropy plus the one-hot gate loss.
    """
    device = pick_device()
    gate.to(device).train()
    for expert in experts.values():
        expert.to(device).train()
    momentum = float(cfg["momentum"])
    optimizer = torch.optim.SGD(
        [
            {"params": [p for e in experts.values() for p in e.parameters()], "lr": float(cfg["lr"])},
            {"params": gate.parameters(), "lr": float(cfg["gate-lr"])},
        ],
        momentum=momentum,
    )
    selected = list(experts)
    losses = []
    for epoch in range(int(cfg["local-epochs"])):
        for idx in _batches(len(x), int(cfg["batch-size"]), seed + epoch):
            xb, eb, yb = x[idx].to(device), embeddings[idx].to(device), y[idx].to(device)
            gate_logits = gate(eb)
            if anchor_expert is not None:
                loss = anchor_loss(experts[anchor_expert](xb), gate_logits, yb, anchor_expert)
            else:
                expert_logits = torch.stack([experts[e](xb) for e in selected], dim=1)
                loss = mixture_loss(gate_logits[:, selected], expert_logits, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def evaluate_zero_shot(
    gate: nn.Module,
    experts: dict[int, nn.Module],
    data: LocalData,
    embeddings: torch.Tensor,
    common_expert_logits: torch.Tensor,
    rule: str = "top1",
) -> dict[str, float]:
    """Zero-shot metrics of the K received experts on the local evaluation data.

    ``zero-shot-acc`` is the accuracy of ``rule`` (one of ``ZERO_SHOT_RULES``); every
    rule's accuracy is reported too, as ``<rule>-acc``.
    """
    selected = list(experts)
    gate_probs = torch.softmax(predict(gate, embeddings), dim=1)
    expert_logits = torch.stack([predict(experts[e], data.eval_x) for e in selected], dim=1)
    top1, mixture = zero_shot_predictions(gate_probs, expert_logits, selected)
    fallback = fallback_predictions(gate_probs, expert_logits, selected, common_expert_logits)
    confident = confident_predictions(gate_probs, expert_logits, selected, common_expert_logits)
    y = data.eval_y
    predictions = (top1, mixture, fallback, confident)
    accuracy = {name: float((pred == y).float().mean()) for name, pred in zip(ZERO_SHOT_RULES, predictions)}
    return {
        "zero-shot-acc": accuracy[rule],
        **{f"{name}-acc": acc for name, acc in accuracy.items()},
        "common-expert-acc": float((common_expert_logits.argmax(1) == y).float().mean()),
        "routing-error": routing_error(gate_probs, y, data.label_to_expert),
        "num-examples": len(y),
    }
