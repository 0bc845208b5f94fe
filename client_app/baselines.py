"""Client side of the baselines: one model (FedAvg, FedProx, common expert) or an
average ensemble of the M experts. Same data, same optimiser settings as DDOME."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict

from client_app.task import expert_from, node_data
from ddome_strategy.arrays import expert_prefix, experts_in, pack_part
from ddome_strategy.client import batches, node_seed, predict, settings
from ddome_strategy.models import pick_device
from ddome_strategy.moe import blend_with_common, proximal_term
from ddome_strategy.protocol import ARRAYS, COMMON_EXPERT, METRICS

# Message types of the baselines (Flower named actions; see client_app/app.py).
TRAIN_SINGLE = "train.single"
EVALUATE_SINGLE = "evaluate.single"
EVALUATE_ENSEMBLE = "evaluate.ensemble"


def _data(message: Message, context: Context):
    cfg = settings(message, context)
    return cfg, node_data(cfg, context)


def train_single(message: Message, context: Context) -> Message:
    """FedAvg / FedProx local training of one model; FedProx sends ``proximal-mu``."""
    cfg, data = _data(message, context)
    model = expert_from(cfg, data, message.content[ARRAYS], "")
    device = pick_device()
    model.to(device).train()
    global_params = [p.detach().clone() for p in model.parameters()]
    mu = float(cfg.get("proximal-mu", 0.0))
    optimizer = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
    seed = node_seed(cfg, context)
    losses = []
    for epoch in range(int(cfg["local-epochs"])):
        for idx in batches(len(data.train_y), int(cfg["batch-size"]), seed + epoch):
            loss = F.cross_entropy(model(data.train_x[idx].to(device)), data.train_y[idx].to(device))
            if mu > 0:
                loss = loss + mu / 2 * proximal_term(model, global_params)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    metrics = {"num-examples": len(data.train_y), "train-loss": sum(losses) / max(len(losses), 1)}
    reply = RecordDict({ARRAYS: ArrayRecord(pack_part(model, "")), METRICS: MetricRecord(metrics)})
    return Message(reply, reply_to=message)


def _accuracy(probs: torch.Tensor, message: Message, cfg, data) -> dict:
    """The model's accuracy and, if the message carries the common expert, ``blend-acc``:
    its probabilities blended with the common expert's as DDOME's ``blend`` rule does (a
    control: how much of that rule's gain any model would get from the common expert)."""
    metrics = {
        "zero-shot-acc": float((probs.argmax(1) == data.eval_y).float().mean()),
        "num-examples": len(data.eval_y),
    }
    if COMMON_EXPERT in message.content:
        common = expert_from(cfg, data, message.content[COMMON_EXPERT], "")
        blend = blend_with_common(probs / probs.sum(1, keepdim=True), predict(common, data.eval_x))
        metrics["blend-acc"] = float((blend.argmax(1) == data.eval_y).float().mean())
    return metrics


def evaluate_single(message: Message, context: Context) -> Message:
    """Accuracy of one model (FedAvg, FedProx, the common expert alone)."""
    cfg, data = _data(message, context)
    model = expert_from(cfg, data, message.content[ARRAYS], "")
    metrics = _accuracy(torch.softmax(predict(model, data.eval_x), 1), message, cfg, data)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


def evaluate_ensemble(message: Message, context: Context) -> Message:
    """Accuracy of the average of all experts' probabilities (Avg-Ensembles)."""
    cfg, data = _data(message, context)
    arrays = message.content[ARRAYS]
    probs = 0
    for e in experts_in(arrays):
        expert = expert_from(cfg, data, arrays, expert_prefix(e))
        probs = probs + torch.softmax(predict(expert, data.eval_x), 1)
    metrics = _accuracy(probs, message, cfg, data)
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)
