"""The paper's comparison on the same partitions, seeds, common expert and round budget.

    python -m benchmarks.compare                          # the CPU preset (Fashion-MNIST)
    python -m benchmarks.compare --config-file configs/cifar10.yaml --seeds 0,1
    python -m benchmarks.compare --run-config anchors-per-round=2 top-k=1   # ablations
    python -m benchmarks.compare --engine simulation      # through flwr.simulation (Ray)

Methods: DDOME; FedAvg and FedProx (Flower's own strategies, one model); FedMix (all M
experts sent every round, gate on the common-expert embedding, no anchors); Avg-Ensembles
(M models trained FedAvg-style, each client trains one at random, predictions averaged);
the common expert alone. All start from the common expert. Every method is evaluated on
the same clients' held-out data and averaged over clients the same way.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from benchmarks.report import routing_matrix, write_report
from client_app import baselines
from client_app.app import app as client_app
from ddome_strategy.strategy import CONFIG, DDOME, METRICS, NORMAL, TASK, TEST, layout_roles
from server_app.app import build_common_expert, build_moe, build_strategy
from server_app.config import DEFAULTS, client_config, resolve
from server_app.inprocess import InProcessGrid

METHODS = ("ddome", "fedavg", "fedprox", "fedmix", "avg-ensembles", "common-expert")
ENGINES = ("inprocess", "simulation")


class CountingGrid:
    """Delegates to a grid; counts the array bytes of TRAIN messages and their replies,
    and can hide nodes (baselines sample among the training clients only)."""

    def __init__(self, grid, visible: Iterable[int] | None = None) -> None:
        self.grid = grid
        self.visible = None if visible is None else list(visible)
        self.train_bytes = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.grid.get_node_ids()) if self.visible is None else list(self.visible)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        for m in [*messages, *replies]:
            if m.metadata.message_type == MessageType.TRAIN and m.has_content():
                self.train_bytes += sum(r.count_bytes() for r in m.content.array_records.values())
        return replies


class RandomExpertEnsemble(DDOME):
    """Avg-Ensembles: every sampled client trains one expert drawn at random (K=1, so the
    gate gets no gradient and each expert is plain FedAvg on its clients)."""

    def route(self, grid, clients, server_round):  # noqa: D102 - see DDOME.route
        return {c.node_id: [int(self.rng.integers(self.num_experts))] for c in clients}

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        return []  # evaluated as an ensemble of all experts by the benchmark's evaluate_fn


def _partition_roles(cfg) -> Callable[[int], tuple[str, int]]:
    """Baselines have no anchors: every training client is a normal client."""
    return lambda pid: (NORMAL, -1) if pid < cfg["num-train-clients"] else (TEST, -1)


def discover_partitions(grid: Grid, cfg: dict) -> dict[int, int]:
    """Node id -> partition id, learned with DDOME's own role query (works on any Grid:
    node ids are arbitrary in Flower's simulation)."""
    strategy = DDOME(
        cfg["num-experts"],
        layout_roles(cfg["num-experts"], cfg["num-train-clients"]),
        top_k=cfg["top-k"],
        client_config=client_config(cfg),
        min_nodes=cfg["num-train-clients"] + cfg["num-test-clients"],
        timeout=cfg["round-timeout"],
    )
    strategy.discover_clients(grid)
    return {node: client.partition_id for node, client in strategy.clients.items()}


def _mean_by_group(replies: list[Message], groups: dict[int, str]) -> dict[str, float]:
    by_group: dict[str, list[float]] = {}
    for reply in replies:
        if not reply.has_error():
            by_group.setdefault(groups[reply.metadata.src_node_id], []).append(
                float(reply.content[METRICS]["zero-shot-acc"])
            )
    return {f"{g}/zero-shot-acc": float(np.mean(v)) for g, v in by_group.items()}


def _evaluator(grid: Grid, partitions: dict[int, int], cfg: dict, task: str, every: int, last: int, history: list):
    """An ``evaluate_fn`` that sends ``arrays`` to every client for ``task``."""
    groups = {node: "test" if pid >= cfg["num-train-clients"] else "train" for node, pid in partitions.items()}
    if not cfg["eval-train-clients"]:
        groups = {n: g for n, g in groups.items() if g == "test"}
    config = ConfigRecord({**client_config(cfg), TASK: task})

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or (server_round % every and server_round != last):
            return None
        messages = [
            Message(RecordDict({"arrays": arrays, CONFIG: config}), dst_node_id=n, message_type=MessageType.EVALUATE)
            for n in groups
        ]
        metrics = _mean_by_group(list(grid.send_and_receive(messages)), groups)
        history.append({"round": server_round, **metrics})
        return MetricRecord(metrics)

    return evaluate_fn


def run_method(method: str, cfg: dict, dataset, common, progress: Callable[[str], None], grid: Grid) -> dict:
    """Run one method on ``grid`` (a fresh federation: no node has state yet); return its figures."""
    rounds, history, train_bytes = cfg["num-server-rounds"], [], []
    started = time.perf_counter()
    partitions = discover_partitions(grid, cfg)
    random.seed(cfg["seed"])  # Flower's FedAvg samples with Python's random
    torch.manual_seed(cfg["seed"])
    per_round = cfg["anchors-per-round"] + cfg["normal-per-round"]

    def on_metrics(server_round, stage, metrics, arrays):
        if stage == "train":
            train_bytes.append(metrics["bytes-total"])
            progress(f"{method}: round {server_round}/{rounds} loss {metrics['train-loss']:.3f}")
        else:
            history.append({"round": server_round, **{k: v for k, v in metrics.items() if k.endswith("zero-shot-acc")}})

    strategy = None
    if method in ("ddome", "fedmix", "avg-ensembles"):
        options = {}
        if method == "fedmix":
            options = dict(
                role_of=_partition_roles(cfg), top_k=cfg["num-experts"], anchors_per_round=0, normal_per_round=per_round
            )
        if method == "avg-ensembles":
            options = dict(role_of=_partition_roles(cfg), top_k=1, anchors_per_round=0, normal_per_round=per_round)
        cls = RandomExpertEnsemble if method == "avg-ensembles" else DDOME
        strategy = build_strategy(cfg, common, on_metrics, cls=cls, **options)
        evaluate_fn = None
        if method == "avg-ensembles":
            evaluate_fn = _evaluator(
                grid, partitions, cfg, baselines.EVALUATE_ENSEMBLE, cfg["eval-every"], rounds, history
            )
        strategy.start(grid, build_moe(cfg, dataset, common), num_rounds=rounds, evaluate_fn=evaluate_fn)
        bytes_per_round = float(np.mean(train_bytes))
    elif method in ("fedavg", "fedprox"):
        # Baselines sample among the training clients, listed in partition order so that
        # Flower's sampling picks the same partitions whatever the engine's node ids.
        train_nodes = sorted((n for n, pid in partitions.items() if pid < cfg["num-train-clients"]), key=partitions.get)
        counting = CountingGrid(grid, train_nodes)
        fraction = per_round / cfg["num-train-clients"]
        kwargs = dict(
            fraction_train=fraction, fraction_evaluate=0.0, min_train_nodes=per_round, min_available_nodes=per_round
        )
        strategy = FedProx(proximal_mu=cfg["fedprox-mu"], **kwargs) if method == "fedprox" else FedAvg(**kwargs)
        train_config = ConfigRecord({**client_config(cfg), TASK: baselines.TRAIN_SINGLE})
        evaluate_fn = _evaluator(grid, partitions, cfg, baselines.EVALUATE_SINGLE, cfg["eval-every"], rounds, history)

        def progress_fn(server_round, arrays):
            if server_round:
                progress(f"{method}: round {server_round}/{rounds}")
            return evaluate_fn(server_round, arrays)

        strategy.start(
            counting,
            ArrayRecord(common.state_dict()),
            num_rounds=rounds,
            train_config=train_config,
            evaluate_fn=progress_fn,
        )
        bytes_per_round = counting.train_bytes / rounds
    else:  # the common expert alone: no training, no traffic
        _evaluator(grid, partitions, cfg, baselines.EVALUATE_SINGLE, 1, 1, history)(1, ArrayRecord(common.state_dict()))
        history[-1]["round"] = rounds
        bytes_per_round = 0.0
    final = history[-1]
    result = {
        "method": method,
        "zero-shot-acc": final.get("test/zero-shot-acc"),
        "train-clients-acc": final.get("train/zero-shot-acc"),
        "bytes-per-round": bytes_per_round,
        "wall-seconds": time.perf_counter() - started,
        "history": history,
    }
    if method in ("ddome", "fedmix"):
        result["routing"] = routing_matrix(cfg, dataset, common, strategy.arrays)
    return result


def run_on_engine(engine: str, method: str, cfg: dict, dataset, common, progress: Callable[[str], None]) -> dict:
    """Run one method on a fresh federation of ``engine``: ``inprocess`` (an
    :class:`InProcessGrid`) or ``simulation`` (``flwr.simulation.run_simulation``, Ray)."""
    num_nodes = cfg["num-train-clients"] + cfg["num-test-clients"]
    if engine == "inprocess":
        grid = InProcessGrid(client_app, num_nodes, {"data-root": cfg["data-root"]})
        return run_method(method, cfg, dataset, common, progress, grid)
    from flwr.simulation import run_simulation

    results: list[dict] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context) -> None:
        results.append(run_method(method, cfg, dataset, common, progress, grid))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_nodes,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not results:
        raise RuntimeError(f"{method}: the simulation's ServerApp did not finish (see the log above)")
    return results[0]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", default="", help="YAML preset of run-config keys (as the app's config-file)")
    parser.add_argument(
        "--run-config", nargs="*", default=[], metavar="KEY=VALUE", help="run-config overrides (YAML values)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds; each gets its own partition and common expert"
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="inprocess",
        help="inprocess: InProcessGrid (fast, deterministic); simulation: flwr.simulation.run_simulation (Ray)",
    )
    parser.add_argument("--fedprox-mu", type=float, default=0.01, help="FedProx's proximal term")
    parser.add_argument("--out", default="", help="output folder (default outputs/benchmark-<time>)")
    parser.add_argument("--replot", metavar="FOLDER", help="only redraw table.md and the plots of a finished benchmark")
    return parser.parse_args(argv)


def resolve_config(args, seed: int) -> dict:
    """The run config the app would use, for one seed."""
    import yaml

    overrides = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.run_config)}
    cfg = resolve({**DEFAULTS, "config-file": args.config_file, **overrides, "seed": seed})
    cfg["fedprox-mu"] = args.fedprox_mu
    return cfg


def main(argv=None) -> Path:
    """Run every method for every seed; write table.md, results.json and plots."""
    args = parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        saved = json.loads((out / "results.json").read_text())
        write_report(out, saved["results"], saved["config"], saved["command"])
        return out
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"Unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    out = Path(args.out or f"outputs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        cfg = resolve_config(args, seed)
        dataset, common, _ = build_common_expert(cfg)
        for method in methods:
            print(f"[seed {seed}] {method} ...", flush=True)
            result = run_on_engine(
                args.engine, method, cfg, dataset, common, lambda line: print(f"  [seed {seed}] {line}", flush=True)
            )
            result["seed"] = seed
            results.append(result)
            print(
                f"[seed {seed}] {method}: zero-shot {result['zero-shot-acc']:.4f} ({result['wall-seconds']:.1f} s)",
                flush=True,
            )
    config = {**{k: v for k, v in cfg.items() if k != "seed"}, "engine": args.engine}
    command = " ".join(["python -m benchmarks.compare", *(argv if argv is not None else sys.argv[1:])])
    (out / "results.json").write_text(json.dumps({"command": command, "config": config, "results": results}, indent=2))
    write_report(out, results, config, command)
    print((out / "table.md").read_text())
    return out


if __name__ == "__main__":
    main()
