"""DDOME ClientApp: one handler per message type, addressed with Flower's named actions.

- ``query.role``: this node's ``role`` (and ``expert``) from its node config, and its
  ``partition-id`` if it has one; a node with ``data-path`` first checks its folder.
- ``query.route``: the mean gate scores of the gate sent (the routing phase).
- ``train``: joint training of the gate and the experts sent.
- ``evaluate``: zero-shot evaluation with the gate and the experts sent.
- ``train.single``, ``evaluate.single``, ``evaluate.ensemble``: the benchmark's
  baselines (one model; the average of all experts).

The run's client configuration comes once, with a node's first message, and is kept
in ``context.state`` (see :func:`client_app.task.settings`).

A node reads its own folder (node config ``data-path``, :func:`client_app.task.node_data`)
or, in the simulation, its ``partition-id`` of the dataset. A folder that cannot be read
gets an error reply naming the node's folder and the problem; the server logs it and
leaves the node out.
"""

from __future__ import annotations

import functools

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client_app import baselines
from client_app.task import (
    embed,
    evaluate_zero_shot,
    expert_from,
    gate_from,
    mean_gate_scores,
    node_data,
    node_seed,
    predict,
    settings,
    train_local,
)
from data.node_data import NodeDataError, check_node_folder
from ddome_strategy.arrays import GATE_PREFIX, expert_prefix, pack_part
from ddome_strategy.protocol import ARRAYS, COMMON_EXPERT, CONFIG, METRICS
from ddome_strategy.roles import ANCHOR, NORMAL, TEST

app = ClientApp()

# Key of the per-node cache of embeddings in ``context.state``.
EMBEDDINGS = "ddome-embeddings"


def _replies_node_errors(handler):
    """Answer a node that cannot read its data (or whose node config or run config does
    not fit it) with an error reply: one sentence naming the node and the problem."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (NodeDataError, ValueError) as err:
            reason = f"{err}" if isinstance(err, NodeDataError) else f"node {context.node_id}: {err}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)

    return wrapped


def _local(message: Message, context: Context):
    """The run's settings for this message, this node's data, and its cached embeddings.

    Embeddings are computed once, when the common expert arrives with the node's
    first message, and kept in ``context.state`` for the rest of the run.
    """
    cfg = settings(message, context)
    data = node_data(cfg, context)
    if COMMON_EXPERT in message.content:
        common = expert_from(cfg, data, message.content[COMMON_EXPERT], "")
        context.state[EMBEDDINGS] = ArrayRecord(
            {
                "train": embed(common, data.train_x),
                "eval": embed(common, data.eval_x),
                "common-expert-logits": predict(common, data.eval_x),
            }
        )
    if EMBEDDINGS not in context.state:
        raise RuntimeError(
            "No common-expert embeddings on this node and no common expert in the "
            "message: the server must resend the common expert."
        )
    cached = {k: torch.from_numpy(v.numpy()) for k, v in context.state[EMBEDDINGS].items()}
    return cfg, data, cached


def _models(cfg, data, arrays: ArrayRecord, embedding_dim: int):
    experts = {int(e): expert_from(cfg, data, arrays, expert_prefix(int(e))) for e in cfg.get("experts", [])}
    return gate_from(cfg, embedding_dim, arrays), experts


@app.query("role")
@_replies_node_errors
def role(message: Message, context: Context) -> Message:
    """Answer the server's role query: ``role`` (and ``expert``) if the node config
    declares them, ``partition-id`` if it has one.

    A node with ``data-path`` checks its folder first (there, readable, in a known
    layout), so that a broken node is reported, and left out, before the first round.
    """
    node = context.node_config
    declared = {}
    if "partition-id" in node:
        declared["partition-id"] = int(node["partition-id"])
    if "role" in node:
        if node["role"] not in (ANCHOR, NORMAL, TEST):
            raise ValueError(f"node config role={node['role']!r} is not one of {ANCHOR}, {NORMAL}, {TEST}.")
        declared["role"] = str(node["role"])
        if node["role"] == ANCHOR:
            if "expert" not in node:
                raise ValueError("node config role='anchor' needs expert=<i> (the expert it anchors).")
            declared["expert"] = int(node["expert"])
    if "data-path" in node:
        if not declared:
            raise ValueError("node config has data-path but neither role nor partition-id.")
        check_node_folder(str(node["data-path"]))
    return Message(RecordDict({CONFIG: ConfigRecord(declared)}), reply_to=message)


@app.query("route")
@_replies_node_errors
def route(message: Message, context: Context) -> Message:
    """Answer the routing query: the mean gate scores of the gate sent over the local data."""
    cfg, data, cached = _local(message, context)
    gate, _ = _models(cfg, data, message.content[ARRAYS], cached["train"].shape[1])
    # Training clients route on their training data, test clients on their unlabeled data.
    embeddings = cached["train"] if len(cached["train"]) else cached["eval"]
    scores = mean_gate_scores(gate, embeddings).tolist()
    return Message(RecordDict({METRICS: MetricRecord({"gate-scores": scores})}), reply_to=message)


@app.train()
@_replies_node_errors
def train(message: Message, context: Context) -> Message:
    """Train the gate and the received experts on the local data."""
    cfg, data, cached = _local(message, context)
    gate, experts = _models(cfg, data, message.content[ARRAYS], cached["train"].shape[1])
    anchor = int(cfg["experts"][0]) if cfg["role"] == ANCHOR else None
    metrics = {"num-examples": len(data.train_y)}
    if anchor is not None:
        predicted = torch.softmax(predict(gate, cached["train"]), 1).argmax(1)
        metrics["routing-acc"] = float((predicted == anchor).float().mean())
    seed = node_seed(cfg, context)
    metrics["train-loss"] = train_local(cfg, gate, experts, data.train_x, cached["train"], data.train_y, anchor, seed)
    arrays = pack_part(gate, GATE_PREFIX)
    for e, expert in experts.items():
        arrays.update(pack_part(expert, expert_prefix(e)))
    reply = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})
    return Message(reply, reply_to=message)


@app.evaluate()
@_replies_node_errors
def evaluate(message: Message, context: Context) -> Message:
    """Zero-shot evaluation with the gate and the K experts the server sent."""
    cfg, data, cached = _local(message, context)
    gate, experts = _models(cfg, data, message.content[ARRAYS], cached["train"].shape[1])
    rule = str(cfg["zero-shot-rule"])
    metrics = evaluate_zero_shot(gate, experts, data, cached["eval"], cached["common-expert-logits"], rule)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


# The benchmark's baselines (client_app/baselines.py).
@app.train("single")
@_replies_node_errors
def train_single(message: Message, context: Context) -> Message:
    """FedAvg / FedProx local training of one model."""
    return baselines.train_single(message, context)


@app.evaluate("single")
@_replies_node_errors
def evaluate_single(message: Message, context: Context) -> Message:
    """Accuracy of one model."""
    return baselines.evaluate_single(message, context)


@app.evaluate("ensemble")
@_replies_node_errors
def evaluate_ensemble(message: Message, context: Context) -> Message:
    """Accuracy of the average of all experts' probabilities."""
    return baselines.evaluate_ensemble(message, context)
