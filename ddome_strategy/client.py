"""Client toolkit: the DDOME side of a ClientApp, from your own models and data.

Give :class:`DDOMEClient` four callables and register it on a Flower ``ClientApp``; it
answers the four message types of the protocol (``docs/protocol.md``)::

    from flwr.clientapp import ClientApp
    from ddome_strategy.client import ClientData, DDOMEClient

    app = ClientApp()
    DDOMEClient(
        load_data=my_data,                  # (cfg, context) -> ClientData
        build_common_expert=my_common,      # (cfg, data) -> module with embed(x) and forward(x) -> logits
        build_gate=my_gate,                 # (cfg, embedding_dim) -> module: embeddings -> M logits
        build_expert=my_expert,             # (cfg, data) -> module: inputs -> logits
    ).register(app)

``cfg`` is the run's client configuration (the strategy's ``client_config``, kept by the
node for the run) with the message's per-round values. The training keys it may set are
:data:`TRAINING_DEFAULTS`'s. The builders' modules get their weights from the message, so
they are built on PyTorch's ``meta`` device (no random initialisation).

What the toolkit does for you: keep the client configuration; embed the node's data once
with the common expert and keep the embeddings for the run (``context.state``); route
(mean gate softmax); train the gate and the received experts jointly (an anchor: its
expert's cross-entropy plus the one-hot gate loss; a normal client: the gated mixture's
cross-entropy); zero-shot evaluation (every rule of :data:`~ddome_strategy.moe.ZERO_SHOT_RULES`);
answer a node that cannot work (``ValueError``, or a missing set-up) with an error reply
naming the node and the problem, after which the server resends the set-up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from torch import nn

from .arrays import GATE_PREFIX, expert_prefix, load_part, pack_part
from .models import pick_device
from .moe import (
    ZERO_SHOT_RULES,
    anchor_generalist_loss,
    anchor_loss,
    blend_predictions,
    confident_predictions,
    fallback_predictions,
    mixture_loss,
    proximal_term,
    routing_error,
    zero_shot_predictions,
)
from .protocol import ARRAYS, CLIENT_CONFIG, COMMON_EXPERT, CONFIG, METRICS, check_version
from .roles import ANCHOR, declared_role

# Training settings a client configuration may set, and their values when it does not.
TRAINING_DEFAULTS = {
    "lr": 0.03,  # the experts' learning rate
    "gate-lr": 0.003,
    "momentum": 0.9,
    "batch-size": 32,
    "local-epochs": 1,
    "generalist-proximal-mu": 1.0,
    "generalist-lr-scale": 1.0,  # the generalist's learning rate, as a multiple of ``lr``
    "anchor-gate-loss": "weigh-generalist",
    "zero-shot-rule": "blend",
    "seed": 0,
}

# Key of the per-node cache of common-expert outputs in ``context.state``.
EMBEDDINGS = "ddome-embeddings"


@dataclass
class ClientData:
    """One node's data: inputs for the experts (the gate sees their embeddings).

    ``label_to_expert`` (label -> the expert whose anchors hold it), if known, gives the
    evaluation its ``routing-error``; without it the routing error is NaN. A test node
    has no training samples (``train_x`` of length 0).
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    label_to_expert: dict[int, int] = field(default_factory=dict)


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
        raise LostSetup("no client configuration on this node and none in the message: the server must resend it.")
    cfg = {**TRAINING_DEFAULTS, **context.state[CLIENT_CONFIG]}
    return {**cfg, **message.content.config_records.get(CONFIG, ConfigRecord())}


def node_seed(cfg, context: Context) -> int:
    """Seed of this node's local shuffling in this round: from its ``partition-id`` (the
    simulation's, reproducible), else from its node id (a deployed node may have none)."""
    own = context.node_config.get("partition-id", context.node_id % 1_000_003)
    return int(cfg["seed"]) * 100_003 + int(cfg["server-round"]) * 1009 + int(own)


def built_with(build: Callable[..., nn.Module], record: ArrayRecord, prefix: str, *args) -> nn.Module:
    """``build(*args)`` with the weights stored under ``prefix`` in ``record`` (strict)."""
    with torch.device("meta"):  # no random initialisation: the weights come next
        module = build(*args)
    load_part(module, record, prefix, assign=True)
    return module


def inference_batch(device: torch.device) -> int:
    """Samples per forward pass when only predicting: on the CPU, 128 keeps a CNN's
    activations in cache (2x faster than 1024, docs/performance.md); GPUs want more."""
    return 1024 if device.type == "cuda" else 128


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int | None = None, method: str = "forward") -> torch.Tensor:
    """``model``'s outputs on ``x`` (``method``: ``forward``, or ``embed`` for features), in batches."""
    device = pick_device()
    batch = batch or inference_batch(device)
    model.to(device).eval()
    apply = getattr(model, method)
    if len(x) == 0:
        return torch.zeros(0, 0)
    return torch.cat([apply(x[i : i + batch].to(device)).cpu() for i in range(0, len(x), batch)])


def embed(common_expert: nn.Module, x: torch.Tensor, batch: int | None = None) -> torch.Tensor:
    """Common-expert embeddings of ``x`` (its ``embed`` method), computed once per node."""
    return predict(common_expert, x, batch, method="embed")


@torch.no_grad()
def mean_gate_scores(gate: nn.Module, embeddings: torch.Tensor) -> np.ndarray:
    """The routing reply: gate probabilities averaged over the local data."""
    return torch.softmax(predict(gate, embeddings), dim=1).mean(0).double().numpy()


def batches(n: int, batch_size: int, seed: int) -> list[torch.Tensor]:
    """Indices of ``n`` samples in shuffled mini-batches (reproducible from ``seed``)."""
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
    generalist: int | None = None,
) -> float:
    """Train the gate and the received experts jointly; return the mean loss.

    A normal client minimises the mixture cross-entropy over its K experts; an anchor
    (``anchor_expert`` set) its expert's cross-entropy plus the one-hot gate loss. With a
    ``generalist`` (the expert every client is sent), both add its own cross-entropy, so
    that it learns from every client as FedAvg's model would, held near the weights it was
    sent by FedProx's proximal term (``generalist-proximal-mu``): it is the one expert every
    client trains, so the one whose local drift averages worst. One
    SGD optimiser: ``lr`` for the specialists, ``lr`` times ``generalist-lr-scale`` for the
    generalist, ``gate-lr`` for the gate, ``momentum``, ``local-epochs`` epochs of
    ``batch-size``.
    """
    device = pick_device()
    gate.to(device).train()
    for expert in experts.values():
        expert.to(device).train()
    lr = float(cfg["lr"])
    expert_lr = {e: lr * float(cfg["generalist-lr-scale"]) if e == generalist else lr for e in experts}
    optimizer = torch.optim.SGD(
        [{"params": expert.parameters(), "lr": expert_lr[e]} for e, expert in experts.items()]
        + [{"params": gate.parameters(), "lr": float(cfg["gate-lr"])}],
        momentum=float(cfg["momentum"]),
    )
    selected = list(experts)
    mu = float(cfg["generalist-proximal-mu"]) if generalist is not None else 0.0
    sent = [p.detach().clone() for p in experts[generalist].parameters()] if mu > 0 else []
    losses = []
    for epoch in range(int(cfg["local-epochs"])):
        for idx in batches(len(x), int(cfg["batch-size"]), seed + epoch):
            xb, eb, yb = x[idx].to(device), embeddings[idx].to(device), y[idx].to(device)
            gate_logits = gate(eb)
            if anchor_expert is not None:
                # The one-hot gate loss is over the anchor-owned experts 0..M-1: an anchor says
                # which specialist owns its data, not that the generalist (expert M) is no help.
                owned_logits = gate_logits if generalist is None else gate_logits[:, :generalist]
                own_logits = experts[anchor_expert](xb)
                loss = anchor_loss(own_logits, owned_logits, yb, anchor_expert)
                if generalist is not None:
                    generalist_logits = experts[generalist](xb)
                    loss = loss + F.cross_entropy(generalist_logits, yb)
                    if cfg["anchor-gate-loss"] == "weigh-generalist":
                        loss = loss + anchor_generalist_loss(
                            gate_logits, own_logits, generalist_logits, yb, anchor_expert, generalist
                        )
            else:
                expert_logits = torch.stack([experts[e](xb) for e in selected], dim=1)
                loss = mixture_loss(gate_logits[:, selected], expert_logits, yb)
                if generalist is not None:
                    loss = loss + F.cross_entropy(expert_logits[:, selected.index(generalist)], yb)
            if mu > 0:
                loss = loss + mu / 2 * proximal_term(experts[generalist], sent)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def evaluate_zero_shot(
    gate: nn.Module,
    experts: dict[int, nn.Module],
    data: ClientData,
    embeddings: torch.Tensor,
    common_expert_logits: torch.Tensor,
    rule: str = "blend",
) -> dict[str, float]:
    """Zero-shot metrics of the K received experts on the local evaluation data.

    ``zero-shot-acc`` is the accuracy of ``rule`` (one of ``ZERO_SHOT_RULES``); every
    rule's accuracy is reported too, as ``<rule>-acc``.
    """
    if rule not in ZERO_SHOT_RULES:
        raise ValueError(f"zero-shot-rule={rule!r} is not one of {', '.join(ZERO_SHOT_RULES)}.")
    selected = list(experts)
    gate_probs = torch.softmax(predict(gate, embeddings), dim=1)
    expert_logits = torch.stack([predict(experts[e], data.eval_x) for e in selected], dim=1)
    top1, mixture = zero_shot_predictions(gate_probs, expert_logits, selected)
    fallback = fallback_predictions(gate_probs, expert_logits, selected, common_expert_logits)
    confident = confident_predictions(gate_probs, expert_logits, selected, common_expert_logits)
    blend = blend_predictions(gate_probs, expert_logits, selected, common_expert_logits)
    y = data.eval_y
    predictions = (top1, mixture, fallback, confident, blend)
    accuracy = {name: float((pred == y).float().mean()) for name, pred in zip(ZERO_SHOT_RULES, predictions)}
    return {
        "zero-shot-acc": accuracy[rule],
        **{f"{name}-acc": acc for name, acc in accuracy.items()},
        "common-expert-acc": float((common_expert_logits.argmax(1) == y).float().mean()),
        "routing-error": routing_error(gate_probs, y, getattr(data, "label_to_expert", {})),
        "num-examples": len(y),
    }


class LostSetup(RuntimeError):
    """The node lost what the server sends once (the client configuration, the common
    expert): it restarted, or the server did not send it. The server resends both after
    the node's error reply."""


def replies_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Answer a node that cannot do its part (a ``ValueError``: its data, its node config,
    a client configuration that does not fit it; or its lost set-up) with an error reply
    naming the node and the problem, instead of a crashed ClientApp."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except (ValueError, LostSetup) as err:
            reason = f"node {context.node_id}: {err}"
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=message)

    return wrapped


class DDOMEClient:
    """The handlers of a DDOME ClientApp, from your own data and model builders.

    Parameters
    ----------
    load_data : callable
        ``(cfg, context) -> ClientData`` (or any object with its attributes): this node's
        data. Called with every message: cache it (``functools.lru_cache``) if loading is slow.
    build_common_expert : callable
        ``(cfg, data) -> nn.Module`` with ``embed(x)`` (the features the gate routes on)
        and ``forward(x)`` (logits); the server's ``common-expert`` record is its state dict.
    build_gate : callable
        ``(cfg, embedding_dim) -> nn.Module`` mapping embeddings to M logits.
    build_expert : callable
        ``(cfg, data) -> nn.Module`` mapping inputs to class logits.
    check_node : callable, optional
        ``(context) -> None``, run on the role query: raise ``ValueError`` if this node
        cannot take part (its data folder is missing, say), so that it is reported and
        left out before the first round.
    build_generalist : callable, optional
        ``(cfg, data) -> nn.Module`` for the generalist (the expert of the per-round key
        ``generalist-expert``) when it differs from the others (this project's is
        narrower); default ``build_expert``.
    """

    def __init__(
        self,
        load_data: Callable[[dict, Context], ClientData],
        build_common_expert: Callable[[dict, ClientData], nn.Module],
        build_gate: Callable[[dict, int], nn.Module],
        build_expert: Callable[[dict, ClientData], nn.Module],
        check_node: Callable[[Context], None] | None = None,
        build_generalist: Callable[[dict, ClientData], nn.Module] | None = None,
    ) -> None:
        self.load_data = load_data
        self.build_common_expert = build_common_expert
        self.build_gate = build_gate
        self.build_expert = build_expert
        self.check_node = check_node
        self.build_generalist = build_generalist or build_expert

    def register(self, app: ClientApp) -> ClientApp:
        """Register the four handlers on ``app`` (``query.role``, ``query.route``,
        ``train``, ``evaluate``) and return it."""
        app.query("role")(replies_errors(self.role))
        app.query("route")(replies_errors(self.route))
        app.train()(replies_errors(self.train))
        app.evaluate()(replies_errors(self.evaluate))
        return app

    def local(self, message: Message, context: Context):
        """The settings of this message, this node's data, and its cached common-expert outputs.

        The outputs (embeddings of the train and eval inputs, the common expert's eval
        logits) are computed when the common expert arrives, with the node's first
        message, and kept in ``context.state`` for the rest of the run.
        """
        cfg = settings(message, context)
        data = self.load_data(cfg, context)
        if COMMON_EXPERT in message.content:
            common = built_with(self.build_common_expert, message.content[COMMON_EXPERT], "", cfg, data)
            context.state[EMBEDDINGS] = ArrayRecord(
                {
                    "train": embed(common, data.train_x),
                    "eval": embed(common, data.eval_x),
                    "common-expert-logits": predict(common, data.eval_x),
                }
            )
        if EMBEDDINGS not in context.state:
            raise LostSetup(
                "no common-expert embeddings on this node and no common expert in the message: "
                "the server must resend the common expert."
            )
        cached = {k: torch.from_numpy(v.numpy()) for k, v in context.state[EMBEDDINGS].items()}
        return cfg, data, cached

    def models(self, cfg, data, arrays: ArrayRecord, embedding_dim: int):
        """The gate and the experts of ``cfg["experts"]``, with the message's weights."""
        gate = built_with(self.build_gate, arrays, GATE_PREFIX, cfg, embedding_dim)
        generalist = cfg.get("generalist-expert")
        experts = {
            int(e): built_with(
                self.build_generalist if e == generalist else self.build_expert,
                arrays,
                expert_prefix(int(e)),
                cfg,
                data,
            )
            for e in cfg.get("experts", [])
        }
        return gate, experts

    def role(self, message: Message, context: Context) -> Message:
        """``query.role``: ``role`` (and ``expert``) and ``partition-id``, whichever the
        node config declares, after :attr:`check_node`."""
        declared = declared_role(context.node_config)
        if self.check_node is not None:
            self.check_node(context)
        return Message(RecordDict({CONFIG: ConfigRecord(declared)}), reply_to=message)

    def route(self, message: Message, context: Context) -> Message:
        """``query.route``: the mean gate scores of the gate sent over the local data."""
        cfg, data, cached = self.local(message, context)
        gate, _ = self.models(cfg, data, message.content[ARRAYS], embedding_dim(cached))
        # Training clients route on their training data, test clients on their unlabeled data.
        embeddings = cached["train"] if len(cached["train"]) else cached["eval"]
        scores = mean_gate_scores(gate, embeddings).tolist()
        return Message(RecordDict({METRICS: MetricRecord({"gate-scores": scores})}), reply_to=message)

    def train(self, message: Message, context: Context) -> Message:
        """``train``: the gate and the received experts trained on the local data."""
        cfg, data, cached = self.local(message, context)
        gate, experts = self.models(cfg, data, message.content[ARRAYS], embedding_dim(cached))
        anchor = int(cfg["experts"][0]) if cfg["role"] == ANCHOR else None
        metrics = {"num-examples": len(data.train_y)}
        if anchor is not None:
            predicted = torch.softmax(predict(gate, cached["train"]), 1).argmax(1)
            metrics["routing-acc"] = float((predicted == anchor).float().mean())
        seed = node_seed(cfg, context)
        generalist = int(cfg["generalist-expert"]) if "generalist-expert" in cfg else None
        metrics["train-loss"] = train_local(
            cfg, gate, experts, data.train_x, cached["train"], data.train_y, anchor, seed, generalist
        )
        arrays = pack_part(gate, GATE_PREFIX)
        for e, expert in experts.items():
            arrays.update(pack_part(expert, expert_prefix(e)))
        reply = RecordDict({ARRAYS: ArrayRecord(arrays), METRICS: MetricRecord(metrics)})
        return Message(reply, reply_to=message)

    def evaluate(self, message: Message, context: Context) -> Message:
        """``evaluate``: zero-shot metrics of the gate and the K experts sent."""
        cfg, data, cached = self.local(message, context)
        gate, experts = self.models(cfg, data, message.content[ARRAYS], embedding_dim(cached))
        rule = str(cfg["zero-shot-rule"])
        metrics = evaluate_zero_shot(gate, experts, data, cached["eval"], cached["common-expert-logits"], rule)
        return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


def embedding_dim(cached: dict[str, torch.Tensor]) -> int:
    """Width of the cached embeddings (a test node has eval samples only)."""
    return max(t.shape[1] for name, t in cached.items() if name in ("train", "eval") and t.dim() == 2)
