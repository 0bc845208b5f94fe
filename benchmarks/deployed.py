"""A deployed DDOME round on this machine next to Flower's floor. Prints figures; asserts nothing.

    python -m benchmarks.deployed                        # the CPU preset: 25 SuperNodes, 6 rounds
    python -m benchmarks.deployed --rounds 4 --run-config num-train-clients=10 num-test-clients=2

Exports the run's partition (``python -m data.export``), starts a SuperLink and one
SuperNode per node folder on loopback (``--insecure``: TLS costs both apps the same), and runs

1. the floor, ``benchmarks/floor_app``: the DDOME strategy's messages answered by a ClientApp
   that imports only flwr and replies at once (what Flower costs per round);
2. DDOME, this app, on the exported folders (``server_app.launch --superlink``).

Then it measures, each in fresh processes, what a DDOME message adds to Flower's: importing
the ClientApp, loading a node's folder, and the local training of a round (one anchor and one
normal client, timed here, spread over the machine's cores as the round's nodes are). Round
times are the time between the ends of consecutive rounds (the first round, which also
pretrains the common expert and embeds every node's data once, is left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomllib

from benchmarks.processes import BIN, Processes, flwr, free_port

REPO = Path(__file__).resolve().parent.parent
FLOOR_APP = Path(__file__).resolve().parent / "floor_app"
CORES = os.cpu_count() or 1


def start_federation(work: Path, nodes: list[dict], env: dict) -> Processes:
    """A SuperLink and one SuperNode per node folder, all online; connection ``bench``."""
    processes = Processes(work / "logs", env)
    port = free_port()
    processes.start(
        "superlink",
        [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)]
        + ["--disable-runtime-dependency-installation"],
    )
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    for i, node in enumerate(nodes):
        declared = f"data-path='{node['path']}' role='{node['role']}'"
        declared += f" expert={node['expert']}" if node["expert"] is not None else ""
        args = ["--insecure", "--superlink", f"127.0.0.1:{port}", "--node-config", declared]
        processes.start(f"supernode-{i}", [str(BIN / "flower-supernode"), *args, "--port", str(free_port())])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        listing = flwr(env, "supernode", "list", "bench", "--format", "json")
        text = listing.stdout[listing.stdout.find("{") :]
        online = [n for n in json.loads(text).get("nodes", []) if n["status"] == "online"] if text else []
        if len(online) == len(nodes):
            return processes
        time.sleep(2)
    processes.stop_all()
    raise SystemExit(f"only {len(online)} of {len(nodes)} SuperNodes came online\n{processes.logs()}")


def round_times(rows: list[dict]) -> dict[int, float]:
    """Seconds per round from the end times of its stages (train, then evaluate if any)."""
    ends = {}
    for row in rows:
        ends[row["round"]] = max(ends.get(row["round"], 0.0), row["time"])
    rounds = sorted(ends)
    return {r: ends[r] - ends[p] for p, r in zip(rounds, rounds[1:])}


def summary(times: dict[int, float], evaluated: set[int]) -> dict:
    plain = [t for r, t in times.items() if r not in evaluated]
    return {
        "round_s": statistics.median(plain) if plain else float("nan"),
        "eval_round_s": statistics.median([times[r] for r in evaluated if r in times] or [float("nan")]),
    }


def fresh_process_seconds(code: str, repeats: int = 3) -> float:
    """Median wall time of ``python -c code`` in a fresh process (the per-message cost)."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def training_seconds(run_config: Path, nodes: list[dict]) -> dict:
    """One anchor's and one normal client's local training of a round, timed in this process
    (the second of two calls: a node's worker pays PyTorch's set-up once per run), and the
    first load of a node folder (a worker loads it once per run)."""
    from client_app.task import build_expert, build_generalist, build_local_gate, load_own_data
    from ddome_strategy.client import embed, train_local
    from server_app.app import build_common_expert
    from server_app.config import DEFAULTS, resolve

    cfg = resolve({**DEFAULTS, **tomllib.loads(run_config.read_text())})
    _, common, _ = build_common_expert(cfg)
    generalist = int(cfg["num-experts"]) if cfg["generalist"] else None
    seconds = {}
    for role in ("anchor", "normal"):
        node = next(n for n in nodes if n["role"] == role)
        started = time.perf_counter()
        data = load_own_data(cfg, node["path"])
        seconds.setdefault("load", time.perf_counter() - started)
        embeddings = embed(common, data.train_x)
        experts = [0] if role == "anchor" else list(range(int(cfg["top-k"])))
        experts += [] if generalist is None else [generalist]
        gate = build_local_gate(cfg, embeddings.shape[1])
        models = {e: (build_generalist if e == generalist else build_expert)(cfg, data) for e in experts}
        anchor = experts[0] if role == "anchor" else None
        cfg_round = {**cfg, "server-round": 1}
        for _ in range(2):  # the first call pays PyTorch's one-time set-up (as a node's first round does)
            started = time.perf_counter()
            train_local(cfg_round, gate, models, data.train_x, embeddings, data.train_y, anchor, 0, generalist)
        seconds[role] = time.perf_counter() - started
    return seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--run-config", nargs="*", default=[], help="run-config overrides of the exported run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the export, logs and outputs here")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ddome-deployed-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)

    from data.export import main as export_main

    export = work / "export"
    overrides = [f"num-server-rounds={args.rounds}", *args.run_config]
    if not (export / "nodes.json").exists():
        export_main(["--out", str(export), "--run-config", *overrides])
    nodes = json.loads((export / "nodes.json").read_text())
    run_config = work / "run.toml"
    run_config.write_text(
        (export / "run-config.toml").read_text()
        + f"output-dir = '{work / 'outputs'}'\ncache-dir = '{work / 'cache'}'\n"
    )
    cfg = tomllib.loads(run_config.read_text())
    eval_every = int(cfg.get("eval-every", 5))
    evaluated = {r for r in range(1, args.rounds + 1) if r % eval_every == 0 or r == args.rounds}

    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(work / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    # Per-message costs first, on a quiet machine (stopping 50 processes later disturbs it).
    imports_flwr = fresh_process_seconds("import flwr.clientapp")
    imports_app = fresh_process_seconds("import client_app.app")
    print(f"== {len(nodes)} SuperNodes on loopback, {args.rounds} rounds; logs in {work / 'logs'}", flush=True)
    processes = start_federation(work, nodes, env)
    try:
        times_file = work / "floor-times.json"
        floor_config = (
            f"num-server-rounds={args.rounds} min-nodes={len(nodes)} times-file='{times_file}' "
            f"num-experts={cfg['num-experts']} top-k={cfg['top-k']} anchors-per-round={cfg['anchors-per-round']} "
            f"normal-per-round={cfg['normal-per-round']} eval-every={eval_every}"
        )
        started = time.perf_counter()
        floor_run = flwr(env, "run", str(FLOOR_APP), "bench", "--stream", "--run-config", floor_config, timeout=1800)
        print(f"floor run: {time.perf_counter() - started:.1f} s", flush=True)
        if not times_file.exists():
            raise SystemExit(f"the floor run failed\n{floor_run.stdout[-3000:]}{floor_run.stderr[-3000:]}")
        floor = summary(round_times(json.loads(times_file.read_text())["rounds"]), evaluated)

        started = time.perf_counter()
        launch = [sys.executable, "-m", "server_app.launch", "--superlink", "bench", "--run-config", str(run_config)]
        ddome_run = subprocess.run(launch, env=env, cwd=REPO, capture_output=True, text=True, timeout=3600)
        print(f"DDOME run: {time.perf_counter() - started:.1f} s (exit {ddome_run.returncode})", flush=True)
        metrics = sorted((work / "outputs").rglob("metrics.jsonl"))
        if ddome_run.returncode or not metrics:
            raise SystemExit(f"the DDOME run failed\n{ddome_run.stdout[-4000:]}")
        rows = [json.loads(line) for line in metrics[-1].read_text().splitlines()]
        ddome = summary(round_times(rows), evaluated)
    finally:
        processes.stop_all()

    train = training_seconds(run_config, nodes)
    per_round = int(cfg["anchors-per-round"]) * train["anchor"] + int(cfg["normal-per-round"]) * train["normal"]
    training_round = per_round / min(CORES, int(cfg["anchors-per-round"]) + int(cfg["normal-per-round"]))
    target = 1.5 * floor["round_s"] + training_round
    result = {
        "supernodes": len(nodes),
        "rounds": args.rounds,
        "floor_round_s": floor["round_s"],
        "floor_eval_round_s": floor["eval_round_s"],
        "ddome_round_s": ddome["round_s"],
        "ddome_eval_round_s": ddome["eval_round_s"],
        "training_round_s": training_round,
        "target_round_s (1.5 x floor + training)": target,
        "per message, fresh process: import flwr.clientapp": imports_flwr,
        "per message, fresh process: import client_app.app": imports_app,
        "per worker (once per node and run): load a node folder": train["load"],
        "local training, one anchor": train["anchor"],
        "local training, one normal client": train["normal"],
        "cores": CORES,
    }
    print(json.dumps(result, indent=1))
    print(
        f"deployed DDOME round {ddome['round_s']:.1f} s vs Flower's floor {floor['round_s']:.1f} s + training "
        f"{training_round:.2f} s: {ddome['round_s'] / (floor['round_s'] + training_round):.2f}x (target <= "
        f"{target:.1f} s)"
    )


if __name__ == "__main__":
    main()
