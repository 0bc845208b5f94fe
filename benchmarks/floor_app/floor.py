"""Flower's floor for a deployed DDOME round: the DDOME strategy sends its messages (role
query, routing, training, evaluation) as in a real run, with one-number "experts"; the
ClientApp imports only flwr and answers each with a minimal valid reply at once."""

import json
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


def reply(message: Message, **records) -> Message:
    return Message(RecordDict(records), reply_to=message)


@client.query("role")
def role(message: Message, context: Context) -> Message:
    from ddome_strategy.roles import declared_role  # as the real ClientApp answers; no torch

    return reply(message, config=ConfigRecord(declared_role(context.node_config)))


@client.query("route")
def route(message: Message, context: Context) -> Message:
    experts = int(context.run_config["num-experts"])
    return reply(message, metrics=MetricRecord({"gate-scores": [1 / experts] * experts}))


@client.train()
def train(message: Message, context: Context) -> Message:
    return reply(message, arrays=message.content["arrays"], metrics=MetricRecord({"num-examples": 1}))


@client.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return reply(message, metrics=MetricRecord({"num-examples": 1, "zero-shot-acc": 0.0}))


@server.main()
def main(grid: Grid, context: Context) -> None:
    from ddome_strategy import DDOME, layout_roles  # the strategy only: no torch

    cfg = context.run_config
    experts = int(cfg["num-experts"])
    times = []
    strategy = DDOME(
        num_experts=experts,
        role_of=layout_roles(experts, 20),  # nodes declare their roles; a fallback only
        top_k=int(cfg["top-k"]),
        anchors_per_round=int(cfg["anchors-per-round"]),
        normal_per_round=int(cfg["normal-per-round"]),
        eval_every=int(cfg["eval-every"]),
        min_nodes=int(cfg["min-nodes"]),
        on_metrics=lambda rnd, stage, *_: times.append({"round": rnd, "stage": stage, "time": time.time()}),
    )
    one = Array(np.zeros(1, np.float32))
    arrays = ArrayRecord({"gate.w": one, **{f"expert.{i}.w": one for i in range(experts)}})
    started = time.time()
    strategy.start(grid, arrays, num_rounds=int(cfg["num-server-rounds"]))
    with open(str(cfg["times-file"]), "w") as out:
        json.dump({"started": started, "rounds": times}, out)
