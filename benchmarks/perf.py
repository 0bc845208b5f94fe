"""Speed and scale of DDOME, next to the limit of the hardware. Prints figures; asserts nothing.

    python -m benchmarks.perf                 # CPU preset + a larger one, all sections
    python -m benchmarks.perf --sections bytes,scale

Sections:
  rounds  per-round wall time: DDOME through Flower's simulation engine (Ray) and through the
          in-process grid, the same local training as one plain PyTorch loop (the limit),
          and Flower's FedAvg training one model of the expert's size
  phases  where a DDOME round's time goes (role query, routing, training, aggregation, evaluation)
  bytes   bytes per round of DDOME and FedMix as M grows (K = 2), from the real messages
  scale   time per round and peak memory with 100 and 1000 clients (10 per round)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from client_app import baselines
from client_app.app import app as client_app
from client_app.task import build_expert, build_local_gate, embed, load_local_data, mean_gate_scores, train_local
from ddome_strategy import DDOME, layout_roles
from ddome_strategy.aggregation import aggregate_moe
from ddome_strategy.arrays import GATE_PREFIX, expert_prefix, load_part, pack_part
from ddome_strategy.moe import top_k_experts
from ddome_strategy.strategy import ARRAYS, CONFIG, METRICS, TASK
from server_app.app import build_common_expert, build_moe, run_ddome
from server_app.config import DEFAULTS, client_config, resolve
from server_app.inprocess import InProcessGrid, ensure_task_identity

PRESETS = {
    "cpu": {},  # the app's defaults: Fashion-MNIST, MLP experts, 20 + 5 clients, 5 + 5 per round
    "larger": {"arch": "cnn", "num-train-clients": 50, "samples-per-client": 1000, "num-server-rounds": 10},
}


def config(preset: str, rounds: int | None = None, **extra) -> dict:
    """A resolved run config for a preset, with evaluation only at the end."""
    overrides = {**PRESETS[preset], **extra, "output-dir": "/tmp/ddome-perf", "eval-train-clients": False}
    if rounds:
        overrides["num-server-rounds"] = rounds
    overrides["eval-every"] = overrides.get("num-server-rounds", DEFAULTS["num-server-rounds"])
    return resolve({**DEFAULTS, **overrides})


def round_times(summary: dict) -> list[float]:
    """Seconds between consecutive rounds' training metrics (rounds 2..n)."""
    rows = [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows if r["stage"] == "train"]
    return list(np.diff(stamps))


def ddome_in_process(cfg: dict) -> list[float]:
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    return round_times(run_ddome(grid, cfg))


def ddome_in_simulation(cfg: dict) -> list[float]:
    summaries = []
    app = ServerApp()

    @app.main()
    def main(grid, context):
        summaries.append(run_ddome(grid, cfg))

    run_simulation(
        server_app=app,
        client_app=client_app,
        num_supernodes=cfg["num-train-clients"] + cfg["num-test-clients"],
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return round_times(summaries[0])


def plain_pytorch(cfg: dict) -> list[float]:
    """The same local work as DDOME's rounds (same sampling, routing by mean gate score,
    joint training, per-expert averaging) as one loop: no messages, no serialisation."""
    dataset, common, _ = build_common_expert(cfg)
    arrays = build_moe(cfg, dataset, common)
    m, s = cfg["num-experts"], cfg["num-train-clients"]
    # One process may use every core (the simulation runs one client per core).
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    rng = np.random.default_rng(cfg["seed"])
    local = {pid: load_local_data(cfg, pid, cfg["data-root"]) for pid in range(s)}
    embeddings = {pid: embed(common, d.train_x) for pid, d in local.items()}  # once, as clients do
    times = []
    for server_round in range(1, cfg["num-server-rounds"] + 1):
        started = time.perf_counter()
        anchors = sorted(int(i) for i in rng.choice(m, cfg["anchors-per-round"], replace=False))
        normals = sorted(m + int(i) for i in rng.choice(s - m, cfg["normal-per-round"], replace=False))
        updates = []
        for pid in [*anchors, *normals]:
            data = local[pid]
            gate = build_local_gate(cfg, common.feature_dim)
            load_part(gate, arrays, GATE_PREFIX)
            chosen = [pid] if pid < m else top_k_experts(mean_gate_scores(gate, embeddings[pid]), cfg["top-k"])
            experts = {}
            for e in chosen:
                experts[e] = build_expert(cfg, data)
                load_part(experts[e], arrays, expert_prefix(e))
            seed = cfg["seed"] * 100_003 + server_round * 1009 + pid
            train_local(cfg, gate, experts, data.train_x, embeddings[pid], data.train_y, pid if pid < m else None, seed)
            state = pack_part(gate, GATE_PREFIX)
            for e, expert in experts.items():
                state.update(pack_part(expert, expert_prefix(e)))
            updates.append((ArrayRecord(state), float(len(data.train_y))))
        arrays = aggregate_moe(arrays, updates)
        times.append(time.perf_counter() - started)
    torch.set_num_threads(threads)
    return times[1:]


def fedavg_in_process(cfg: dict) -> list[float]:
    """Flower's FedAvg training one model of the experts' size on the same clients."""
    from benchmarks.compare import CountingGrid

    _, common, _ = build_common_expert(cfg)
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    training = CountingGrid(
        grid, [n for n, c in grid.contexts.items() if c.node_config["partition-id"] < cfg["num-train-clients"]]
    )
    per_round = cfg["anchors-per-round"] + cfg["normal-per-round"]
    strategy = FedAvg(
        fraction_train=per_round / cfg["num-train-clients"],
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_available_nodes=per_round,
    )
    stamps = []
    strategy.start(
        training,
        ArrayRecord(common.state_dict()),
        num_rounds=cfg["num-server-rounds"],
        train_config=ConfigRecord({**client_config(cfg), TASK: baselines.TRAIN_SINGLE}),
        evaluate_fn=lambda r, a: stamps.append(time.perf_counter()),
    )
    return list(np.diff(stamps))[1:]


class PhaseTimer(InProcessGrid):
    """Times each send_and_receive by the task of its messages."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = defaultdict(float)

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        task = str(messages[0].content[CONFIG][TASK])
        started = time.perf_counter()
        replies = super().send_and_receive(messages, timeout=timeout)
        self.seconds[f"clients: {task}"] += time.perf_counter() - started
        return replies


def phases(cfg: dict) -> dict[str, float]:
    """Seconds per round in each phase of DDOME (in-process grid, so no transport)."""
    grid = PhaseTimer(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    original = DDOME.aggregate_train

    def timed_aggregate(self, server_round, replies):
        started = time.perf_counter()
        result = original(self, server_round, replies)
        grid.seconds["server: aggregation + checks"] += time.perf_counter() - started
        return result

    DDOME.aggregate_train = timed_aggregate
    try:
        started = time.perf_counter()
        run_ddome(grid, cfg)
        total = time.perf_counter() - started
    finally:
        DDOME.aggregate_train = original
    rounds = cfg["num-server-rounds"]
    out = {k: v / rounds for k, v in sorted(grid.seconds.items())}
    out["total run incl. common expert, start-up (per round)"] = total / rounds
    return out


class EchoGrid:
    """Nodes that answer like DDOME's ClientApp without computing: a training client
    returns what it was sent, so byte counts are those of real messages."""

    def __init__(self, num_nodes: int, num_experts: int) -> None:
        ensure_task_identity()
        self.num_nodes, self.num_experts = num_nodes, num_experts

    def get_node_ids(self):
        return list(range(1, self.num_nodes + 1))

    def send_and_receive(self, messages, *, timeout=None):
        return [self._reply(m) for m in messages]

    def _reply(self, message: Message) -> Message:
        task = message.content[CONFIG][TASK]
        if task == "role":
            content = {CONFIG: ConfigRecord({"partition-id": message.metadata.dst_node_id - 1})}
        elif task == "route":
            scores = np.random.default_rng(message.metadata.dst_node_id).dirichlet(np.ones(self.num_experts))
            content = {METRICS: MetricRecord({"gate-scores": scores.tolist()})}
        else:
            content = {ARRAYS: message.content[ARRAYS], METRICS: MetricRecord({"num-examples": 100})}
        return Message(RecordDict(content), reply_to=message)


def bytes_per_round(num_experts: int, fedmix: bool, cfg: dict) -> float:
    """Training bytes of one round (gate, experts, scores, down and up) with MLP experts
    on 28x28 inputs: DDOME with 5 anchors + 5 normal clients and K=2, or FedMix (all M
    experts to 10 clients)."""
    from ddome_strategy.arrays import pack_moe
    from ddome_strategy.models import build_gate, build_model

    gate = build_gate(cfg["mlp-hidden"], num_experts, cfg["gate-hidden"])
    experts = [build_model("mlp", (1, 28, 28), 10, cfg["mlp-hidden"]) for _ in range(num_experts)]
    num_train = num_experts + 10
    if fedmix:
        options = dict(
            role_of=lambda pid: ("normal", -1) if pid < num_train else ("test", -1),
            top_k=num_experts,
            anchors_per_round=0,
            normal_per_round=10,
        )
    else:
        options = dict(role_of=layout_roles(num_experts, num_train), top_k=2, anchors_per_round=5, normal_per_round=5)
    strategy = DDOME(num_experts, eval_every=100, eval_train_clients=False, **options)
    result = strategy.start(EchoGrid(num_train + 1, num_experts), pack_moe(gate, experts), num_rounds=2)
    return float(result.train_metrics_clientapp[2]["bytes-total"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="rounds,phases,bytes,scale")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per timing run (the first is excluded)")
    parser.add_argument(
        "--presets", default=",".join(PRESETS), help=f"subset of {','.join(PRESETS)} for the rounds section"
    )
    args = parser.parse_args(argv)
    sections = args.sections.split(",")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {open('/proc/loadavg').read().split()[:3]}"
    )
    if "rounds" in sections:
        for preset in args.presets.split(","):
            cfg = config(preset, args.rounds)
            figures = {
                "plain PyTorch loop (limit)": plain_pytorch(cfg),
                "DDOME, in-process grid": ddome_in_process(cfg),
                "DDOME, Flower simulation (Ray)": ddome_in_simulation(cfg),
                "Flower FedAvg, one model, in-process": fedavg_in_process(cfg),
            }
            limit = float(np.median(figures["plain PyTorch loop (limit)"]))
            print(f"\n[rounds] preset {preset}: median seconds per round (rounds 2..{args.rounds})")
            for name, times in figures.items():
                median = float(np.median(times))
                print(f"  {name:40s} {median:7.3f} s   x{median / limit:5.2f} of the limit")
    if "phases" in sections:
        print("\n[phases] preset cpu: seconds per round by phase (in-process grid)")
        for name, seconds in phases(config("cpu", args.rounds)).items():
            print(f"  {name:55s} {seconds:7.3f}")
    if "bytes" in sections:
        print("\n[bytes] MB per round (training traffic, K=2, MLP experts, 5 + 5 clients)")
        for m in (5, 10, 20, 40):
            print(
                f"  M={m:3d}  DDOME {bytes_per_round(m, False, DEFAULTS) / 1e6:8.2f}   FedMix {bytes_per_round(m, True, DEFAULTS) / 1e6:8.2f}"
            )
    if "scale" in sections:
        print("\n[scale] 10 clients per round, in-process grid")
        for clients in (100, 1000):
            cfg = config("cpu", args.rounds, **{"num-train-clients": clients})
            started = time.perf_counter()
            times = ddome_in_process(cfg)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"  {clients:5d} clients: {np.median(times):.3f} s per round, whole run {time.perf_counter() - started:.1f} s, peak RSS so far {peak:.0f} MB"
            )


if __name__ == "__main__":
    main()
