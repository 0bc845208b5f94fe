"""Speed and scale of DDOME, next to the limit of the hardware. Prints figures; asserts nothing.

    python -m benchmarks.perf                      # every section, CPU preset + a larger one
    python -m benchmarks.perf --sections rounds --presets cpu
    python -m benchmarks.perf --sections gpu       # on a machine with CUDA

Sections:
  rounds  per-round wall time: DDOME through Flower's simulation engine (Ray) and through the
          in-process grid; the same local training as one plain PyTorch loop (the limit: the
          faster of one thread and every core); Flower's FedAvg training one model of the
          expert's size (in-process and simulated); training samples per second
  phases  where a DDOME round's time goes (role query, routing, dispatch, local training,
          aggregation, evaluation, checkpoint), in-process grid
  bytes   bytes per round of DDOME and FedMix as M grows (K = 2), from the real messages
  scale   time per round and peak memory with 100 and 1000 clients (10 per round), each in
          a fresh process so that its peak RSS is its own
  poll    the simulation with Flower's default 0.1 s reply polling vs DDOME's 0.01 s
  gpu     local-training samples per second on CUDA vs the CPU, and a simulated run with
          ``client_resources.num_gpus`` (prints "no CUDA" where there is none)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

import ddome_strategy.strategy as strategy_module
import server_app.app as server_module
from benchmarks.compare import SingleFedAvg
from client_app import task as client_task
from client_app.app import app as client_app
from client_app.task import build_expert, build_local_gate, load_local_data
from data.settings import partitioned
from ddome_strategy import DDOME, layout_roles
from ddome_strategy import client as toolkit
from ddome_strategy.aggregation import aggregate_moe
from ddome_strategy.arrays import GATE_PREFIX, expert_prefix, load_part, pack_part
from ddome_strategy.client import embed, mean_gate_scores, train_local
from ddome_strategy.dispatch import top_k_experts
from ddome_strategy.protocol import ARRAYS, CONFIG, METRICS, ROLE_QUERY, ROUTE_QUERY, NodeSetup
from server_app.app import build_common_expert, build_moe, run_ddome
from server_app.config import DEFAULTS, client_config, resolve
from server_app.inprocess import InProcessGrid, ensure_task_identity

PRESETS = {
    "cpu": {},  # the app's defaults: Fashion-MNIST, MLP experts, 20 + 5 clients, 5 + 5 per round
    "larger": {"arch": "cnn", "num-train-clients": 50, "samples-per-client": 1000, "num-server-rounds": 10},
    "tiny": {"config-file": "configs/digits-tiny.yaml"},  # the end-to-end test's run (8x8 digits)
}
CORES = os.cpu_count() or 1


def config(preset: str, rounds: int | None = None, **extra) -> dict:
    """A resolved run config for a preset, with evaluation only at the end."""
    overrides = {**PRESETS[preset], **extra, "output-dir": "/tmp/ddome-perf", "eval-train-clients": False}
    if rounds:
        overrides["num-server-rounds"] = rounds
    overrides["eval-every"] = overrides.get("num-server-rounds", DEFAULTS["num-server-rounds"])
    return resolve({**DEFAULTS, **overrides})


def samples_per_round(cfg: dict) -> int:
    """Training samples processed per round (each sampled client's data, every local epoch)."""
    return (cfg["anchors-per-round"] + cfg["normal-per-round"]) * cfg["samples-per-client"] * cfg["local-epochs"]


def round_times(summary: dict) -> list[float]:
    """Seconds between consecutive rounds' training metrics (rounds 2..n)."""
    rows = [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]
    stamps = [r["time"] for r in rows if r["stage"] == "train"]
    return list(np.diff(stamps))


def ddome_in_process(cfg: dict) -> list[float]:
    grid = InProcessGrid(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    return round_times(run_ddome(grid, cfg))


def _simulate(server: ServerApp, num_supernodes: int, num_gpus: float = 0.0) -> None:
    run_simulation(
        server_app=server,
        client_app=client_app,
        num_supernodes=num_supernodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": num_gpus}},
    )


def ddome_in_simulation(cfg: dict, num_gpus: float = 0.0) -> list[float]:
    """DDOME through Flower's simulation engine (Ray backend, one CPU per client, so
    as many clients at once as there are cores)."""
    summaries = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        summaries.append(run_ddome(grid, cfg))

    _simulate(server, cfg["num-train-clients"] + cfg["num-test-clients"], num_gpus)
    return round_times(summaries[0])


def polling(cfg: dict, repeats: int) -> dict[float, list[float]]:
    """DDOME through the simulation with Flower's default reply polling (every 0.1 s) and
    with DDOME's (every ``POLL_INTERVAL``), alternating, ``repeats`` runs each: medians."""
    out: dict[float, list[float]] = {0.1: [], strategy_module.POLL_INTERVAL: []}
    default = strategy_module.POLL_INTERVAL
    try:
        for _ in range(repeats):
            for interval in out:
                strategy_module.POLL_INTERVAL = interval
                out[interval].append(float(np.median(ddome_in_simulation(cfg))))
    finally:
        strategy_module.POLL_INTERVAL = default
    return out


def plain_pytorch(cfg: dict, threads: int) -> list[float]:
    """The same local work as DDOME's rounds (same sampling, embedding on first contact,
    routing by mean gate score, joint training, per-expert averaging) as one loop: no
    messages, no serialisation, no evaluation (the timed runs evaluate after the last round)."""
    dataset, common, _ = build_common_expert(cfg)
    arrays = build_moe(cfg, dataset, common)
    m, s = cfg["num-experts"], cfg["num-train-clients"]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    rng = np.random.default_rng(cfg["seed"])
    local = {pid: load_local_data(cfg, pid, cfg["data-root"]) for pid in range(s)}
    embeddings = {}  # once per client, when it is first sampled, as DDOME's clients do
    times = []
    for server_round in range(1, cfg["num-server-rounds"] + 1):
        started = time.perf_counter()
        anchors = sorted(int(i) for i in rng.choice(m, cfg["anchors-per-round"], replace=False))
        normals = sorted(m + int(i) for i in rng.choice(s - m, cfg["normal-per-round"], replace=False))
        updates = []
        for pid in [*anchors, *normals]:
            data = local[pid]
            if pid not in embeddings:
                embeddings[pid] = embed(common, data.train_x)
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
    torch.set_num_threads(before)
    return times[1:]


def _fedavg(cfg: dict, grid, common) -> list[float]:
    per_round = cfg["anchors-per-round"] + cfg["normal-per-round"]
    strategy = SingleFedAvg(
        NodeSetup(client_config(cfg)),
        fraction_train=per_round / cfg["num-train-clients"],
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_available_nodes=per_round,
    )
    stamps = []
    strategy.start(
        grid,
        ArrayRecord(common.state_dict()),
        num_rounds=cfg["num-server-rounds"],
        evaluate_fn=lambda r, a: stamps.append(time.perf_counter()),
    )
    return list(np.diff(stamps))[1:]


def fedavg_in_process(cfg: dict) -> list[float]:
    """Flower's FedAvg training one model of the experts' size on the same clients."""
    _, common, _ = build_common_expert(cfg)
    return _fedavg(cfg, InProcessGrid(client_app, cfg["num-train-clients"]), common)


def fedavg_in_simulation(cfg: dict) -> list[float]:
    """The same through Flower's simulation engine (the training clients only)."""
    _, common, _ = build_common_expert(cfg)
    times = []
    server = ServerApp()

    @server.main()
    def main(grid, context):
        times.extend(_fedavg(cfg, grid, common))

    _simulate(server, cfg["num-train-clients"])
    return times


class PhaseTimer(InProcessGrid):
    """Times each send_and_receive by the task of its messages (client-side work,
    including (de)serialising the records, since that runs inside the ClientApp)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seconds = defaultdict(float)
        self.in_grid = 0.0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        task = messages[0].metadata.message_type
        started = time.perf_counter()
        replies = super().send_and_receive(messages, timeout=timeout)
        elapsed = time.perf_counter() - started
        self.in_grid += elapsed
        self.seconds[
            {ROLE_QUERY: "1 role query (clients)", ROUTE_QUERY: "2 routing (clients: mean gate scores)"}.get(
                task, f"4 {task} (clients)"
            )
        ] += elapsed
        return replies


def phases(cfg: dict) -> dict[str, float]:
    """Seconds per round in each phase of DDOME (in-process grid, so no transport)."""
    grid = PhaseTimer(client_app, cfg["num-train-clients"] + cfg["num-test-clients"])
    patched = {}

    def timed(owner, name, label, server_side=True):
        original = getattr(owner, name)
        patched[(owner, name)] = original

        def wrapper(*args, **kwargs):
            in_grid, started = grid.in_grid, time.perf_counter()
            result = original(*args, **kwargs)
            # Server-side time only: the clients' part (role query, routing) is counted above.
            grid.seconds[label] += time.perf_counter() - started - (grid.in_grid - in_grid)
            return result

        setattr(owner, name, wrapper)

    timed(DDOME, "configure_train", "3 sampling + dispatch (server: select top-K, build messages)")
    timed(DDOME, "configure_evaluate", "3 sampling + dispatch (server: select top-K, build messages)")
    timed(DDOME, "aggregate_train", "5 aggregation + update checks (server)")
    timed(DDOME, "aggregate_evaluate", "5 aggregation + update checks (server)")
    timed(server_module, "save_checkpoint", "6 checkpoint after every round (server)")
    try:
        started = time.perf_counter()
        run_ddome(grid, cfg)
        total = time.perf_counter() - started
    finally:
        for (owner, name), original in patched.items():
            setattr(owner, name, original)
    rounds = cfg["num-server-rounds"]
    out = {k[2:]: v / rounds for k, v in sorted(grid.seconds.items())}
    out["whole run per round (incl. start-up, common expert, embeddings)"] = total / rounds
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
        kind = message.metadata.message_type
        if kind == ROLE_QUERY:
            content = {CONFIG: ConfigRecord({"partition-id": message.metadata.dst_node_id - 1})}
        elif kind == ROUTE_QUERY:
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
            role_of=layout_roles(num_experts, num_train, anchors=False),
            top_k=num_experts,
            anchors_per_round=0,
            normal_per_round=10,
        )
    else:
        options = dict(role_of=layout_roles(num_experts, num_train), top_k=2, anchors_per_round=5, normal_per_round=5)
    strategy = DDOME(num_experts, eval_every=100, eval_train_clients=False, **options)
    result = strategy.start(EchoGrid(num_train + 1, num_experts), pack_moe(gate, experts), num_rounds=2)
    return float(result.train_metrics_clientapp[2]["bytes-total"])


def _vm(field: str) -> float:
    """A field of /proc/self/status in MB (VmRSS: now, VmHWM: peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scale_one(clients: int, rounds: int, simulate: bool) -> dict:
    """One scale measurement in this (fresh) process."""
    cfg = config("cpu", rounds, **{"num-train-clients": clients})
    build_common_expert(cfg)  # cached on disk after the first run: not part of the figure
    partitioned(cfg)
    before = _vm("VmRSS")
    started = time.perf_counter()
    times = ddome_in_simulation(cfg) if simulate else ddome_in_process(cfg)
    return {
        "clients": clients,
        "engine": "simulation (Ray)" if simulate else "in-process grid",
        "round_s": float(np.median(times)),
        "run_s": time.perf_counter() - started,
        "rss_before_rounds_mb": before,
        "peak_rss_mb": _vm("VmHWM"),
        "rss_after_mb": _vm("VmRSS"),
        "partition_cache": str(client_task._local_data.cache_info()),
    }


def scale(rounds: int, simulate: bool) -> list[dict]:
    out = []
    for clients in (100, 1000):
        command = [sys.executable, "-m", "benchmarks.perf", "--scale-one", str(clients), "--rounds", str(rounds)]
        if simulate:
            command.append("--simulate")
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("SCALE ")]
        out.append(json.loads(lines[-1][6:]) if lines else {"clients": clients, "error": done.stderr[-2000:]})
    return out


def throughput(cfg: dict, device: torch.device, repeats: int = 3) -> float:
    """Samples per second of one normal client's local training (gate + K experts)."""
    real = toolkit.pick_device
    toolkit.pick_device = lambda: device
    try:
        dataset, common, _ = build_common_expert(cfg)
        arrays = build_moe(cfg, dataset, common)
        data = load_local_data(cfg, cfg["num-experts"], cfg["data-root"])
        embeddings = embed(common, data.train_x)
        best = float("inf")
        for repeat in range(repeats + 1):
            gate = build_local_gate(cfg, common.feature_dim)
            load_part(gate, arrays, GATE_PREFIX)
            experts = {}
            for e in range(cfg["top-k"]):
                experts[e] = build_expert(cfg, data)
                load_part(experts[e], arrays, expert_prefix(e))
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            train_local(cfg, gate, experts, data.train_x, embeddings, data.train_y, None, repeat)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if repeat:  # the first is a warm-up
                best = min(best, time.perf_counter() - started)
        return len(data.train_y) * cfg["local-epochs"] / best
    finally:
        toolkit.pick_device = real


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="rounds,phases,bytes,scale,gpu")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per timing run (the first is excluded)")
    parser.add_argument("--presets", default="cpu,larger", help=f"subset of {','.join(PRESETS)}")
    parser.add_argument("--simulate", action="store_true", help="scale section through Ray instead of in-process")
    parser.add_argument("--scale-one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_one:
        print("SCALE " + json.dumps(scale_one(args.scale_one, args.rounds, args.simulate)))
        return
    sections = args.sections.split(",")
    presets = args.presets.split(",")
    print(
        f"torch {torch.__version__}, {CORES} cores, torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}"
    )
    if "rounds" in sections:
        for preset in presets:
            cfg = config(preset, args.rounds)
            plain = {1: plain_pytorch(cfg, 1), CORES: plain_pytorch(cfg, CORES)}
            best_threads = min(plain, key=lambda t: np.median(plain[t]))
            figures = {
                "plain PyTorch loop, 1 thread": plain[1],
                f"plain PyTorch loop, {CORES} threads": plain[CORES],
                f"DDOME, in-process grid ({torch.get_num_threads()} thread(s))": ddome_in_process(cfg),
                f"DDOME, Flower simulation (Ray, {CORES} workers)": ddome_in_simulation(cfg),
                "Flower FedAvg, one model, in-process": fedavg_in_process(cfg),
                "Flower FedAvg, one model, simulation": fedavg_in_simulation(cfg),
            }
            limit = float(np.median(plain[best_threads]))
            one = float(np.median(plain[1]))
            print(
                f"\n[rounds] preset {preset}: median seconds per round (rounds 2..{args.rounds}); "
                f"limit = plain loop with {best_threads} thread(s); {samples_per_round(cfg)} training samples per round"
            )
            for name, times in figures.items():
                median = float(np.median(times))
                print(
                    f"  {name:45s} {median:7.3f} s  x{median / limit:5.2f} of the limit  x{median / one:5.2f} of 1 thread"
                    f"  {samples_per_round(cfg) / median:8.0f} samples/s"
                )
    if "phases" in sections:
        for preset in presets:
            print(f"\n[phases] preset {preset}: seconds per round by phase (in-process grid)")
            for name, seconds in phases(config(preset, args.rounds)).items():
                print(f"  {name:66s} {seconds:7.3f}")
    if "bytes" in sections:
        print("\n[bytes] MB per round (training traffic, K=2, MLP experts, 5 + 5 clients)")
        for m in (5, 10, 20, 40):
            print(
                f"  M={m:3d}  DDOME {bytes_per_round(m, False, DEFAULTS) / 1e6:8.2f}   "
                f"FedMix {bytes_per_round(m, True, DEFAULTS) / 1e6:8.2f}"
            )
    if "scale" in sections:
        print(
            f"\n[scale] preset cpu, 10 clients per round, {'simulation' if args.simulate else 'in-process grid'}, "
            "one fresh process per size"
        )
        for row in scale(args.rounds, args.simulate):
            if "error" in row:
                print(f"  {row['clients']:5d} clients: failed: {row['error']}")
                continue
            print(
                f"  {row['clients']:5d} clients: {row['round_s']:.3f} s per round, {args.rounds}-round run "
                f"{row['run_s']:.1f} s, RSS {row['rss_before_rounds_mb']:.0f} MB before the rounds, "
                f"peak {row['peak_rss_mb']:.0f} MB, {row['rss_after_mb']:.0f} MB after; {row['partition_cache']}"
            )
    if "poll" in sections:
        for preset in presets:
            print(f"\n[poll] preset {preset}: simulation, median seconds per round of each run, by polling interval")
            for interval, medians in polling(config(preset, args.rounds), 3).items():
                print(
                    f"  poll every {interval:.2f} s: {' '.join(f'{m:.3f}' for m in medians)}  (median {np.median(medians):.3f})"
                )
    if "gpu" in sections:
        print("\n[gpu] local training, one normal client (gate + K experts), samples per second")
        for preset in presets:
            cfg = config(preset, args.rounds)
            cpu = throughput(cfg, torch.device("cpu"))
            line = f"  preset {preset}: CPU {cpu:8.0f} samples/s"
            if torch.cuda.is_available():
                gpu = throughput(cfg, torch.device("cuda"))
                line += f", CUDA ({torch.cuda.get_device_name()}) {gpu:8.0f} samples/s, x{gpu / cpu:.1f}"
                sim = float(np.median(ddome_in_simulation(cfg, num_gpus=1.0 / CORES)))
                line += f"; simulation with num_gpus={1.0 / CORES:.2f}: {sim:.3f} s per round"
            else:
                line += "; no CUDA on this machine: GPU not measured"
            print(line)
    print(
        f"\nthis process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB, "
        f"load average now {' '.join(open('/proc/loadavg').read().split()[:3])}"
    )


if __name__ == "__main__":
    main()
