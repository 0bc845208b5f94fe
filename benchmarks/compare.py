"""The paper's comparison on the same partitions, seeds, common expert and round budget.

    python -m benchmarks.compare                          # the CPU preset (Fashion-MNIST)
    python -m benchmarks.compare --tune --seeds 0,1,2     # each method at its own best setting
    python -m benchmarks.compare --config-file configs/cifar10.yaml --seeds 0,1
    python -m benchmarks.compare --run-config anchors-per-round=2 top-k=1   # ablations
    python -m benchmarks.compare --engine simulation      # through flwr.simulation (Ray)

``--tune`` gives every method the same tuning budget: the grid ``TUNING_GRID`` (local
batch size, learning rate; FedProx also its proximal mu), each point scored on the
validation split (a slice of the training split held out from every client, with the
test clients' label sets: the test split is never read), the best point per method
(mean over the seeds) then run on the test split, and the spec's setting beside it.

Every method is evaluated every round and reported as the mean of its last 5
evaluations, with the final one and the paper's best-of-last-10 beside it.

Methods: DDOME; FedAvg and FedProx (Flower's own strategies, one model); FedMix (all M
experts sent every round, gate on the common-expert embedding, no anchors); Avg-Ensembles
(M models trained FedAvg-style, each client trains one at random, predictions averaged);
the common expert alone. All start from the same initialisation (the experts'
``experts-init``; single-model methods from the first expert). Every method is evaluated on
the same clients' held-out data and averaged over clients the same way; FedMix by the
gated mixture of all M experts it was trained for, DDOME zero-shot by its
``zero-shot-rule`` (default: the gated mixture of its K experts; the paper config: top-1
of K), with every rule's accuracy recorded.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from benchmarks.report import routing_matrix, write_report
from client_app import baselines
from client_app.app import app as client_app
from ddome_strategy.arrays import expert_prefix
from ddome_strategy.protocol import ARRAYS, COMMON_EXPERT, CONFIG, METRICS, NodeSetup
from ddome_strategy.roles import TEST, layout_roles, role_in_layout
from ddome_strategy.strategy import DDOME, Exchange, Routing, evaluates
from server_app.app import build_common_expert, build_moe, build_strategy
from server_app.config import DEFAULTS, client_config, load_preset, resolve
from server_app.inprocess import InProcessGrid

METHODS = (
    "ddome",
    "ddome-paper",
    "ddome-no-generalist",
    "fedavg",
    "fedprox",
    "fedmix",
    "avg-ensembles",
    "common-expert",
)
# DDOME beside its default, each a preset on top of it: as the paper runs it (K = 2, top-1
# of K, no generalist, the spec's local training), and without the generalist expert (an
# ablation row: the default before it).
VARIANT_PRESETS = {"ddome-paper": "configs/paper.yaml", "ddome-no-generalist": "configs/no-generalist.yaml"}
# Methods run as they are, never tuned.
UNTUNED = ("ddome-paper", "common-expert")
# The options that make DDOME's default, recorded with every run.
DDOME_OPTIONS = (
    "top-k",
    "top-k-min",
    "dispatch-mass",
    "zero-shot-rule",
    "dirichlet-anchors",
    "generalist",
    "generalist-width",
    "generalist-proximal-mu",
    "generalist-lr-scale",
    "anchor-gate-loss",
)
ENGINES = ("inprocess", "simulation")

# The same grid for every method (the gate's learning rate stays a tenth of the experts',
# the spec's ratio); FedProx also tries each proximal mu.
TUNING_GRID = {"batch-size": (32, 256), "lr": (0.01, 0.03, 0.1)}
FEDPROX_MUS = (0.001, 0.01, 0.1, 1.0)
# The spec's local training (batch 256, lr 0.01, gate lr 0.001), reported for every method.
SPEC_SETTING = {"batch-size": 256, "lr": 0.01, "gate-lr": 0.001}
# What a method's accuracy is: FedMix predicts with the gated mixture it was trained for.
SCORE = {"fedmix": "mixture-acc"}
LAST_EVALUATIONS = 5  # reported: the mean of the last 5 evaluations
BEST_OF = 10  # and the paper's best of the last 10


class CountingGrid:
    """Delegates to a grid; counts the array bytes of training messages (``train``,
    ``train.single``) and their replies, and can hide nodes (baselines sample among the
    training clients only)."""

    def __init__(self, grid, visible: Iterable[int] | None = None) -> None:
        self.grid = grid
        self.visible = None if visible is None else list(visible)
        self.train_bytes = 0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.grid.get_node_ids()) if self.visible is None else list(self.visible)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        # Replies in the order the messages were sent, not of arrival: Flower's FedAvg sums
        # in reply order, and Ray's arrival order would change the last bits.
        position = {m.metadata.dst_node_id: i for i, m in enumerate(messages)}
        replies = sorted(
            self.grid.send_and_receive(messages, timeout=timeout),
            key=lambda r: position.get(r.metadata.src_node_id, len(position)),
        )
        for m in [*messages, *replies]:
            if m.metadata.message_type.split(".")[0] == MessageType.TRAIN and m.has_content():
                self.train_bytes += sum(r.count_bytes() for r in m.content.array_records.values())
        return replies


class RandomExpertEnsemble(DDOME):
    """Avg-Ensembles: every sampled client trains one expert drawn at random (K=1, so the
    gate gets no gradient and each expert is plain FedAvg on its clients)."""

    def route(self, grid, clients, server_round, arrays, phase="routing"):  # noqa: D102 - see DDOME.route
        # The route phase without an exchange (nothing is sent, no bytes): a random expert each.
        return Routing({c.node_id: [int(self.rng.integers(self.num_experts))] for c in clients}, {}, Exchange())

    def evaluation_clients(self, grid, server_round):  # noqa: D102 - see DDOME.evaluation_clients
        return []  # evaluated as an ensemble of all experts by the benchmark's evaluate_fn


class _SingleModel:
    """Flower's FedAvg/FedProx addressing the ClientApp's ``train.single`` and
    ``evaluate.single`` actions, each node getting the client configuration (``setup``)
    with its first message only, again after an error reply."""

    setup: NodeSetup

    def _construct_messages(self, record: RecordDict, node_ids: list[int], message_type: str) -> list[Message]:
        return [
            Message(
                content=self.setup.attach(node, RecordDict(dict(record))),
                dst_node_id=node,
                message_type=f"{message_type}.single",
            )
            for node in node_ids
        ]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        for reply in replies:
            if reply.has_error():
                self.setup.forget(reply.metadata.src_node_id)
        return super().aggregate_train(server_round, replies)


class SingleFedAvg(_SingleModel, FedAvg):
    """FedAvg on ``train.single`` (see :class:`_SingleModel`)."""

    def __init__(self, setup: NodeSetup, **kwargs) -> None:
        super().__init__(**kwargs)
        self.setup = setup


class SingleFedProx(_SingleModel, FedProx):
    """FedProx on ``train.single`` (see :class:`_SingleModel`)."""

    def __init__(self, setup: NodeSetup, **kwargs) -> None:
        super().__init__(**kwargs)
        self.setup = setup


def discover_partitions(grid: Grid, cfg: dict) -> dict[int, int]:
    """Node id -> partition id, learned with DDOME's own role query (works on any Grid:
    node ids are arbitrary in Flower's simulation)."""
    strategy = DDOME(
        cfg["num-experts"],
        layout_roles(cfg["num-experts"], cfg["num-train-clients"]),
        top_k=cfg["top-k"],
        min_nodes=cfg["num-train-clients"] + cfg["num-test-clients"],
        timeout=cfg["round-timeout"],
    )
    strategy.discover(grid)
    return {node: client.partition_id for node, client in strategy.clients.items()}


def _mean_by_group(replies: list[Message], groups: dict[int, str]) -> dict[str, float]:
    """``<group>/<metric>``: the mean over the group's clients of each accuracy they reported."""
    by_key: dict[str, list[float]] = {}
    for reply in sorted(replies, key=lambda r: r.metadata.src_node_id):
        if not reply.has_error():
            for name, value in reply.content[METRICS].items():
                if name.endswith("-acc"):
                    by_key.setdefault(f"{groups[reply.metadata.src_node_id]}/{name}", []).append(float(value))
    return {key: float(np.mean(values)) for key, values in by_key.items()}


def summarise(history: list[dict], group: str = "test", metric: str = "zero-shot-acc") -> dict[str, float | None]:
    """The reported figures of one run's ``<group>/<metric>`` curve: the mean of the last
    ``LAST_EVALUATIONS`` evaluations (the headline), the final one, and the paper's best of
    the last ``BEST_OF``."""
    key = f"{group}/{metric}"
    curve = [h[key] for h in history if h.get(key) is not None]
    if not curve:
        return {"mean-last": None, "final": None, "best-of-last": None}
    return {
        "mean-last": float(np.mean(curve[-LAST_EVALUATIONS:])),
        "final": float(curve[-1]),
        "best-of-last": float(np.max(curve[-BEST_OF:])),
    }


def _evaluator(
    grid: Grid,
    partitions: dict[int, int],
    cfg: dict,
    message_type: str,
    every: int,
    last: int,
    history: list,
    setup: NodeSetup | None = None,
    common=None,
):
    """An ``evaluate_fn`` that sends ``arrays`` to every client as ``message_type``
    (``evaluate.single`` or ``evaluate.ensemble``), with the client configuration
    (``setup``) to the nodes that do not have it yet, and the ``common`` expert, if given,
    for the blend control (evaluation traffic: not counted in the bytes per round)."""
    layout = (cfg["num-experts"], cfg["num-train-clients"])
    groups = {node: "test" if role_in_layout(pid, *layout)[0] == TEST else "train" for node, pid in partitions.items()}
    if not cfg["eval-train-clients"]:
        groups = {n: g for n, g in groups.items() if g == "test"}
    setup = setup if setup is not None else NodeSetup(client_config(cfg))
    common_record = {} if common is None else {COMMON_EXPERT: ArrayRecord(common.state_dict())}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 or not evaluates(server_round, last, every, cfg["eval-last-rounds"]):
            return None
        content = {ARRAYS: arrays, CONFIG: ConfigRecord({"server-round": server_round}), **common_record}
        messages = [
            Message(
                setup.attach(n, RecordDict(content)),
                dst_node_id=n,
                message_type=message_type,
            )
            for n in groups
        ]
        replies = list(grid.send_and_receive(messages))
        for reply in replies:
            if reply.has_error():
                setup.forget(reply.metadata.src_node_id)
        metrics = _mean_by_group(replies, groups)
        history.append({"round": server_round, **metrics})
        return MetricRecord(metrics)

    return evaluate_fn


def first_expert(moe: ArrayRecord) -> ArrayRecord:
    """Expert 0 of a packed MoE as a plain model: the single-model methods' start, so that
    every method starts from the same initialisation whatever ``experts-init`` says."""
    prefix = expert_prefix(0)
    return ArrayRecord({k[len(prefix) :]: v for k, v in moe.items() if k.startswith(prefix)}, keep_input=True)


def run_method(method: str, cfg: dict, dataset, common, progress: Callable[[str], None], grid: Grid) -> dict:
    """Run one method on ``grid`` (a fresh federation: no node has state yet); return its figures."""
    if method != "ddome":
        # The generalist and adaptive dispatch are DDOME's own: the baselines keep their
        # M experts and their dispatch (FedMix all M, Avg-Ensembles one).
        cfg = {**cfg, "generalist": False, "dispatch-mass": 0.0}
    rounds, history, train_bytes = cfg["num-server-rounds"], [], []
    started = time.perf_counter()
    partitions = discover_partitions(grid, cfg)
    random.seed(cfg["seed"])  # Flower's FedAvg samples with Python's random
    initial = build_moe(cfg, dataset, common)  # seeds torch with cfg["seed"]
    per_round = cfg["anchors-per-round"] + cfg["normal-per-round"]
    score = SCORE.get(method, "zero-shot-acc")

    def on_metrics(server_round, stage, metrics, arrays):
        if stage == "train":
            train_bytes.append(metrics["bytes-total"])
            progress(f"{method}: round {server_round}/{rounds} loss {metrics['train-loss']:.3f}")
        else:
            # Every prediction rule's accuracy (top-1 of K, mixture, fallback), whichever is the score.
            row = {k: v for k, v in metrics.items() if k.endswith(("-acc", "/routing-error")) and "/common" not in k}
            row.update(
                {f"{g}/zero-shot-acc": metrics[f"{g}/{score}"] for g in ("test", "train") if f"{g}/{score}" in metrics}
            )
            history.append({"round": server_round, **row})

    strategy = None
    if method in ("ddome", "fedmix", "avg-ensembles"):
        options = {}
        # No anchors: every training client is a normal client.
        no_anchors = layout_roles(cfg["num-experts"], cfg["num-train-clients"], anchors=False)
        if method == "fedmix":
            options = dict(
                role_of=no_anchors, top_k=cfg["num-experts"], anchors_per_round=0, normal_per_round=per_round
            )
        if method == "avg-ensembles":
            options = dict(role_of=no_anchors, top_k=1, anchors_per_round=0, normal_per_round=per_round)
        cls = RandomExpertEnsemble if method == "avg-ensembles" else DDOME
        strategy = build_strategy(cfg, common, on_metrics, cls=cls, **options)
        evaluate_fn = None
        if method == "avg-ensembles":
            evaluate_fn = _evaluator(
                grid, partitions, cfg, baselines.EVALUATE_ENSEMBLE, cfg["eval-every"], rounds, history, common=common
            )
        strategy.start(grid, initial, num_rounds=rounds, evaluate_fn=evaluate_fn)
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
        setup = NodeSetup(client_config(cfg))  # the client configuration, once per node
        if method == "fedprox":
            strategy = SingleFedProx(setup, proximal_mu=cfg["fedprox-mu"], **kwargs)
        else:
            strategy = SingleFedAvg(setup, **kwargs)
        evaluate_fn = _evaluator(
            grid, partitions, cfg, baselines.EVALUATE_SINGLE, cfg["eval-every"], rounds, history, setup, common
        )

        def progress_fn(server_round, arrays):
            if server_round:
                progress(f"{method}: round {server_round}/{rounds}")
            return evaluate_fn(server_round, arrays)

        strategy.start(
            counting,
            first_expert(initial),
            num_rounds=rounds,
            evaluate_fn=progress_fn,
        )
        bytes_per_round = counting.train_bytes / rounds
    else:  # the common expert alone: no training, no traffic
        _evaluator(grid, partitions, cfg, baselines.EVALUATE_SINGLE, 1, 1, history)(1, ArrayRecord(common.state_dict()))
        history[-1]["round"] = rounds
        bytes_per_round = 0.0
    test, train = summarise(history, "test"), summarise(history, "train")
    result = {
        "method": method,
        "score": score,
        "zero-shot-acc": test["mean-last"],
        "final-acc": test["final"],
        "best-of-last-10-acc": test["best-of-last"],
        "train-clients-acc": train["mean-last"],
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
    parser.add_argument("--fedprox-mu", type=float, default=0.01, help="FedProx's proximal term (without --tune)")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="choose each method's batch size and learning rate (FedProx: and mu) on the validation split, "
        "then report every method at its own best setting and at the spec's setting",
    )
    parser.add_argument(
        "--tuned", default="", help="with --tune: a tuning.json (or results.json) whose grid runs to choose from"
    )
    parser.add_argument("--out", default="", help="output folder (default outputs/benchmark-<time>)")
    parser.add_argument("--verbose", action="store_true", help="also show Flower's per-round logs")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (in-process engine; one core each)")
    parser.add_argument("--replot", metavar="FOLDER", help="only redraw table.md and the plots of a finished benchmark")
    return parser.parse_args(argv)


def resolve_config(args, seed: int, setting: dict | None = None) -> dict:
    """The run config the app would use, for one seed and a tuning ``setting``.

    The benchmark evaluates every round of the last ``BEST_OF`` rounds unless
    ``eval-last-rounds`` is given: its figures are means over the last evaluations.
    """
    import yaml

    explicit = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.run_config)}
    explicit = {"eval-last-rounds": BEST_OF, **explicit, "config-file": args.config_file, "seed": seed}
    setting = dict(setting or {})
    mu = setting.pop("fedprox-mu", args.fedprox_mu)
    explicit.update(setting)
    cfg = resolve({**DEFAULTS, **explicit}, explicit=explicit)
    cfg["fedprox-mu"] = mu
    return cfg


def tuning_points(method: str) -> list[dict]:
    """The grid points of ``method``: ``TUNING_GRID`` (gate lr a tenth of lr), times
    ``FEDPROX_MUS`` for FedProx; the common expert alone has nothing to tune."""
    if method in UNTUNED:
        return [{}]
    points = [
        {"batch-size": batch, "lr": lr, "gate-lr": lr / 10}
        for batch in TUNING_GRID["batch-size"]
        for lr in TUNING_GRID["lr"]
    ]
    if method == "fedprox":
        points = [{**p, "fedprox-mu": mu} for p in points for mu in FEDPROX_MUS]
    return points


def setting_name(setting: dict) -> str:
    """A grid point as a short label, e.g. ``batch 256, lr 0.01, mu 0.1``."""
    names = {"batch-size": "batch", "lr": "lr", "fedprox-mu": "mu"}
    return ", ".join(f"{names[k]} {v:g}" for k, v in setting.items() if k in names) or "none"


def run_one(args, seed: int, method: str, setting: dict, split: str, label: str) -> dict:
    """One method at one setting for one seed on ``split``, on a fresh federation."""
    preset = load_preset(VARIANT_PRESETS[method]) if method in VARIANT_PRESETS else {}
    cfg = resolve_config(args, seed, {**preset, **setting, "evaluation-split": split})
    dataset, common, _ = build_common_expert(cfg)
    name = f"[{label} seed {seed}] {method} ({setting_name(setting)})"
    print(f"{name} ...", flush=True)
    result = run_on_engine(
        args.engine, "ddome" if method in VARIANT_PRESETS else method, cfg, dataset, common, lambda line: None
    )
    result["method"] = method
    if method == "ddome" or method in VARIANT_PRESETS:  # the baselines run without them
        result["ddome-options"] = {k: cfg[k] for k in DDOME_OPTIONS}
    trained_with = {k: cfg[k] for k in ("batch-size", "lr")} if method != "common-expert" else {}
    if method == "fedprox":
        trained_with["fedprox-mu"] = cfg["fedprox-mu"]
    result.update(seed=seed, setting=setting, split=split, kind=label, **{"trained-with": trained_with})
    print(f"{name}: {result['zero-shot-acc']:.4f} ({result['wall-seconds']:.1f} s)", flush=True)
    return result


def _run_quietly(*task) -> dict:
    logging.getLogger("flwr").setLevel(logging.WARNING)
    return run_one(*task)


def run_seeds(args, methods: list[str], seeds: list[int], settings: dict[str, list[dict]], split: str, label: str):
    """Run every method at each of its ``settings`` for every seed on ``split``, in
    ``args.jobs`` processes (runs are independent and seeded: the same results in any)."""
    tasks = [
        (args, seed, method, setting, split, label)
        for seed in seeds
        for method in methods
        for setting in settings[method]
    ]
    return run_tasks(tasks, args.jobs)


def run_tasks(tasks: list[tuple], jobs: int) -> list[dict]:
    """``run_one(*task)`` for every task, in ``jobs`` processes; results in task order."""
    if jobs <= 1:
        return [run_one(*task) for task in tasks]
    # Workers must not inherit Ray or torch thread state: start them fresh.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_run_quietly, *zip(*tasks)))


def best_settings(tuning: list[dict], methods: list[str]) -> dict[str, dict]:
    """Per method, the grid point with the best validation score, averaged over seeds
    (ties: the first point of the grid)."""
    chosen = {}
    for method in methods:
        if method in UNTUNED:
            chosen[method] = {}
            continue
        points = [r["setting"] for r in tuning if r["method"] == method and r["seed"] == tuning[0]["seed"]]
        scores = [
            np.mean([r["zero-shot-acc"] for r in tuning if r["method"] == method and r["setting"] == p]) for p in points
        ]
        chosen[method] = points[int(np.argmax(scores))]
    return chosen


def spec_setting(method: str, chosen: dict) -> dict:
    """The spec's local training for ``method`` (FedProx keeps the mu ``chosen`` for it)."""
    if method in UNTUNED:  # the paper preset already trains with the spec's setting
        return {}
    return {**SPEC_SETTING, **({"fedprox-mu": chosen["fedprox-mu"]} if method == "fedprox" else {})}


def main(argv=None) -> Path:
    """Run every method for every seed; write table.md, results.json and plots."""
    args = parse_args(argv)
    if args.replot:
        out = Path(args.replot)
        saved = json.loads((out / "results.json").read_text())
        write_report(out, saved["results"], saved["config"], saved["command"], saved.get("tuning"))
        return out
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"Unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    # The benchmark prints one line per run; Flower's round logs would bury them.
    with flower_log_level(logging.INFO if args.verbose else logging.WARNING):
        return benchmark(args, methods, seeds, argv)


@contextmanager
def flower_log_level(level: int) -> Iterator[None]:
    """Flower's logger at ``level`` for a while, then as it was."""
    logger = logging.getLogger("flwr")
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


def benchmark(args, methods: list[str], seeds: list[int], argv=None) -> Path:
    """Run (and with ``--tune`` choose) every method for every seed; write the report."""
    out = Path(args.out or f"outputs/benchmark-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    tuning = None
    if args.tune:
        if args.tuned:  # the grid was already scored: choose from those runs
            tuning = json.loads(Path(args.tuned).read_text())["tuning"]
        else:
            tuning = run_seeds(args, methods, seeds, {m: tuning_points(m) for m in methods}, "validation", "tune")
            # Kept at once: a failure in the runs that follow loses none of the grid.
            (out / "tuning.json").write_text(json.dumps({"tuning": tuning}, indent=2))
        chosen = best_settings(tuning, methods)
        results = run_seeds(args, methods, seeds, {m: [chosen[m]] for m in methods}, "test", "best")
        spec = {m: spec_setting(m, chosen[m]) for m in methods if spec_setting(m, chosen[m]) != chosen[m]}
        results += run_seeds(args, list(spec), seeds, {m: [s] for m, s in spec.items()}, "test", "spec")
        for r in results:
            r["spec-setting"] = r["setting"] == spec_setting(r["method"], chosen[r["method"]])
    else:
        results = run_seeds(args, methods, seeds, {m: [{}] for m in methods}, "test", "run")
    cfg = resolve_config(args, seeds[-1])
    config = {**{k: v for k, v in cfg.items() if k != "seed"}, "engine": args.engine, "tuned": args.tune}
    command = " ".join(["python -m benchmarks.compare", *(argv if argv is not None else sys.argv[1:])])
    saved = {"command": command, "config": config, "results": results, "tuning": tuning}
    (out / "results.json").write_text(json.dumps(saved, indent=2))
    write_report(out, results, config, command, tuning)
    print((out / "table.md").read_text())
    return out


if __name__ == "__main__":
    main()
