"""DDOME ServerApp: build everything from the run config, run the rounds, write results."""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml
from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from data.node_data import NodeDataError, load_node_data, spec_from_run_config
from data.settings import partitioned
from ddome_strategy import DDOME, layout_roles, pack_moe
from ddome_strategy.aggregation import check_update
from ddome_strategy.common_expert import load_or_pretrain
from ddome_strategy.models import NARROWABLE, build_gate, build_model, generalist_hidden, narrowed
from ddome_strategy.moe import ZERO_SHOT_RULES
from server_app.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from server_app.config import ConfigError, client_config, node_local, resolve
from server_app.logs import quiet_flower_rounds
from server_app.plots import write_plots
from server_app.results import RunWriter

app = ServerApp()


@dataclass(frozen=True)
class ModelShape:
    """What the server needs to build models without the dataset: one sample's shape and
    the number of classes (the run's :class:`~data.node_data.DataSpec`)."""

    input_shape: tuple[int, ...]
    num_classes: int


def build_common_expert(cfg: dict):
    """The common expert, and the input shape and classes the models are built for.

    Simulation: load the dataset, partition it, pretrain on the public split (cached).
    Node-local data (``public-data-path`` or ``common-expert-path``): the server never
    opens the dataset or any client's data; see :func:`common_expert_on_node_local_data`.
    """
    if node_local(cfg):
        return common_expert_on_node_local_data(cfg)
    dataset, plan = partitioned(cfg)
    settings = _settings(cfg, cfg["dataset"])
    common, accuracy, path = load_or_pretrain(settings, dataset, plan.public_indices, cfg["cache-dir"])
    log(INFO, "Common expert: accuracy %.4f on the public validation slice (%s)", accuracy, path)
    return dataset, common, accuracy


def _settings(cfg: dict, dataset: str) -> dict:
    return {
        "dataset": dataset,
        "arch": cfg["arch"],
        "hidden": cfg["mlp-hidden"],
        "target_acc": cfg["common-expert-target-acc"],
        "max_epochs": cfg["common-expert-max-epochs"],
        "seed": cfg["seed"],
    }


def common_expert_on_node_local_data(cfg: dict):
    """The common expert of a deployment, without the dataset.

    ``public-data-path``: pretrain on that folder's samples (either layout, normalised
    with the run's DataSpec), stopping early on a validation slice of them exactly as
    :func:`~ddome_strategy.common_expert.load_or_pretrain` does in the simulation; the
    cache key holds a hash of the samples. ``common-expert-path``: a ready checkpoint
    (``torch.load(weights_only=True)``; a state dict, or ``{"state_dict": ..., "accuracy": ...}``
    as the cache writes), checked against the configured architecture.

    Returns
    -------
    tuple
        ``(ModelShape, common expert, its public validation accuracy or NaN)``.
    """
    spec = spec_from_run_config(cfg)
    if cfg["public-data-path"]:
        try:
            public = load_node_data(cfg["public-data-path"], spec)
        except NodeDataError as err:
            raise ConfigError(f"public-data-path: {err}") from err
        # Public samples are the training split; an eval split there is public too.
        x, y = torch.cat([public.train_x, public.eval_x]), torch.cat([public.train_y, public.eval_y])
        if len(y) < 2:
            raise ConfigError(f"public-data-path {cfg['public-data-path']!r} holds {len(y)} samples; it needs several.")
        shape = ModelShape(tuple(x.shape[1:]), spec.num_classes)
        digest = hashlib.sha256(x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:16]
        dataset = SimpleNamespace(train_x=x, train_y=y, input_shape=shape.input_shape, num_classes=shape.num_classes)
        settings = _settings(cfg, f"public:{digest}")
        common, accuracy, path = load_or_pretrain(settings, dataset, np.arange(len(y)), cfg["cache-dir"])
        log(INFO, "Common expert: accuracy %.4f on the public validation slice (%s)", accuracy, path)
        return shape, common, accuracy
    if spec.input_shape is None:
        raise ConfigError("common-expert-path needs input-shape (e.g. '1,28,28') to build the architecture.")
    shape = ModelShape(spec.input_shape, spec.num_classes)
    path = Path(cfg["common-expert-path"]).expanduser()
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - unpickling refuses or fails in many ways
        raise ConfigError(f"common-expert-path {str(path)!r} cannot be loaded safely ({err}).") from err
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"common-expert-path {str(path)!r} holds no state dict.")
    torch.manual_seed(cfg["seed"])
    common = build_model(cfg["arch"], shape.input_shape, shape.num_classes, cfg["mlp-hidden"])
    try:
        common.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(
            f"common-expert-path {str(path)!r} does not fit arch={cfg['arch']!r} mlp-hidden={cfg['mlp-hidden']} "
            f"input-shape={shape.input_shape} with {shape.num_classes} classes ({str(err).splitlines()[0]})."
        ) from err
    accuracy = checkpoint.get("accuracy", float("nan")) if "state_dict" in checkpoint else float("nan")
    log(INFO, "Common expert: loaded %s", path)
    return shape, common.eval(), float(accuracy)


def build_moe(cfg: dict, dataset, common) -> ArrayRecord:
    """The initial gate (random) and experts (copies of the common expert, or random).

    The generalist (expert M) has ``generalist-width`` of the experts' hidden units (mlp,
    cnn; a ResNet's is as wide); from the common expert, it keeps the units that matter
    most (:func:`narrowed`).
    """
    torch.manual_seed(cfg["seed"])
    count = cfg["num-experts"] + cfg["generalist"]  # the generalist is expert M
    # Experts first, then the gate: expert i's random initialisation does not depend on
    # whether a generalist (and a wider gate) follows, so every method starts the same.
    if cfg["experts-init"] == "common":
        experts = [copy.deepcopy(common) for _ in range(count)]
    else:
        experts = [
            build_model(cfg["arch"], dataset.input_shape, dataset.num_classes, cfg["mlp-hidden"]) for _ in range(count)
        ]
    if cfg["generalist"] and cfg["generalist-width"] < 1 and cfg["arch"] in NARROWABLE:
        experts[-1] = narrowed(experts[-1], generalist_hidden(cfg["mlp-hidden"], cfg["generalist-width"]))
    gate = build_gate(common.feature_dim, count, cfg["gate-hidden"])
    return pack_moe(gate, experts)


def build_strategy(cfg: dict, common, on_metrics=None, cls: type[DDOME] = DDOME, **overrides) -> DDOME:
    """The DDOME strategy (or subclass ``cls``) as configured; ``overrides`` replace
    constructor arguments."""
    options = dict(
        top_k=cfg["top-k"],
        min_top_k=cfg["top-k-min"],
        dispatch_mass=cfg["dispatch-mass"],
        generalist=cfg["generalist"],
        anchors_per_round=cfg["anchors-per-round"],
        normal_per_round=cfg["normal-per-round"],
        common_expert=ArrayRecord(common.state_dict()),
        client_config=client_config(cfg),
        eval_every=cfg["eval-every"],
        eval_last=cfg["eval-last-rounds"],
        eval_train_clients=cfg["eval-train-clients"],
        min_train_replies=cfg["min-train-replies"],
        min_nodes=cfg["num-train-clients"] + cfg["num-test-clients"],
        timeout=cfg["round-timeout"],
        seed=cfg["seed"],
        on_metrics=on_metrics,
    )
    options.update(overrides)
    role_of = options.pop("role_of", layout_roles(cfg["num-experts"], cfg["num-train-clients"]))
    return cls(cfg["num-experts"], role_of, **options)


def print_summary(
    writer: RunWriter, common_accuracy: float, seconds: float, rule: str, plots: dict | None = None
) -> dict:
    """Print the final zero-shot figures (under ``rule``, with the spec's top-1 of K beside
    it) next to the common expert's; ``plots`` (name -> path in the run folder) is listed
    in ``summary.json``."""
    evaluations = [row for row in writer.history if row["stage"] == "evaluate"]
    final = evaluations[-1] if evaluations else {}
    summary = {
        "rounds": max((row["round"] for row in writer.history), default=0),
        "zero-shot-rule": rule,
        "zero-shot-acc": final.get("test/zero-shot-acc"),
        **{f"{name}-acc": final.get(f"test/{name}-acc") for name in ZERO_SHOT_RULES},
        "routing-error": final.get("test/routing-error"),
        "common-expert-acc": final.get("test/common-expert-acc"),
        "train-clients-acc": final.get("train/zero-shot-acc"),
        "common-expert-public-validation-acc": common_accuracy,
        "bytes-per-round": sum(r["bytes-total"] for r in writer.history if r["stage"] == "train")
        / max(1, sum(r["stage"] == "train" for r in writer.history)),
        "wall-seconds": seconds,
        "output": str(writer.path),
        "plots": plots or {},
    }

    def fmt(value):
        return "n/a" if value is None else f"{100 * value:.2f}%"

    lines = [
        "",
        "=" * 64,
        "DDOME result on the unseen test clients (zero-shot, no labels, no fine-tuning)",
        f"  {'zero-shot accuracy (' + rule + ')':<34} {fmt(summary['zero-shot-acc'])}",
        f"  gated mixture of K alone           {fmt(summary['mixture-acc'])}",
        f"  top-1 of K (the paper's rule)      {fmt(summary['top1-acc'])}",
        f"  common expert alone, same clients  {fmt(summary['common-expert-acc'])}",
        f"  gate routing error per sample      {fmt(summary['routing-error'])}",
        f"  training clients' accuracy         {fmt(summary['train-clients-acc'])}",
        f"  bytes per round                    {summary['bytes-per-round'] / 1e6:.2f} MB",
        f"  wall time                          {seconds:.1f} s",
        f"  results in                         {writer.path}",
        "=" * 64,
    ]
    for line in lines:
        log(INFO, line)
    writer.save_summary(summary)
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run DDOME as configured by ``context.run_config``."""
    try:
        # The keys given with --run-config: they beat a preset even when equal to the default.
        explicit = dict(grid.run.override_config)
    except (AttributeError, TypeError, ValueError):
        explicit = None  # a grid without run information (e.g. server_app.inprocess)
    run_ddome(grid, dict(context.run_config), explicit=explicit)


def run_ddome(grid: Grid, run_config: dict, explicit: dict | None = None) -> dict:
    """Resolve the configuration, run DDOME on ``grid`` and write the results.

    ``explicit`` is the user's ``--run-config`` keys (see :func:`server_app.config.resolve`).

    Returns
    -------
    dict
        The run's summary (also written to ``summary.json``).
    """
    logging.getLogger("ddome_strategy").setLevel(logging.INFO)
    started = time.perf_counter()
    cfg = resolve(run_config, explicit)
    done, arrays, strategy_state, torch_rng, run_dir = 0, None, None, None, None
    if cfg["resume"]:
        done, arrays, strategy_state, torch_rng, run_dir = resume_point(cfg)
    writer = RunWriter(cfg["output-dir"], cfg, run_dir)
    if run_dir is not None:
        writer.keep_rounds_up_to(done)
        log(INFO, "DDOME run: resuming %s after round %d", writer.path, done)
    else:
        log(INFO, "DDOME run: results go to %s", writer.path)
    dataset, common, common_accuracy = build_common_expert(cfg)
    writer.save_arrays("common_expert", ArrayRecord(common.state_dict()))

    def on_metrics(server_round: int, stage: str, metrics: dict, arrays: ArrayRecord) -> None:
        writer.log(server_round, stage, metrics)

    strategy = build_strategy(cfg, common, on_metrics)
    if strategy_state is not None:
        try:
            strategy.load_state_dict(strategy_state)
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"resume: the checkpoint's strategy state is invalid ({err!r}).") from err

    def checkpoint(server_round: int, arrays: ArrayRecord) -> None:
        # Called by Strategy.start after every round's evaluation: the round is complete.
        save_checkpoint(writer.path, server_round, arrays, strategy.state_dict())

    initial = build_moe(cfg, dataset, common)
    if arrays is not None:
        reason = check_update(arrays, initial, 1)
        if reason:
            raise ConfigError(f"resume: the checkpoint does not fit this configuration ({reason}).")
    strategy.arrays = arrays if arrays is not None else initial
    if torch_rng is not None:
        torch.set_rng_state(torch_rng)
    if done < cfg["num-server-rounds"]:
        with quiet_flower_rounds(not cfg["verbose"]):
            strategy.start(
                grid,
                strategy.arrays,
                num_rounds=cfg["num-server-rounds"],
                first_round=done + 1,
                timeout=cfg["round-timeout"],
                evaluate_fn=checkpoint,
            )
    writer.save_arrays("moe", strategy.arrays)
    plots = write_plots(writer.path, writer.history, strategy.last_routing, strategy.generalist)
    return print_summary(writer, common_accuracy, time.perf_counter() - started, cfg["zero-shot-rule"], plots)


# Keys a resumed run may change; any other difference would make it a different run.
RESUMABLE_CHANGES = {
    "resume",
    "num-server-rounds",
    "round-timeout",
    "output-dir",
    "cache-dir",
    "config-file",
    "data-root",
    "verbose",
}


def resume_point(cfg: dict):
    """Load the checkpoint named by ``resume`` and check the run's configuration matches."""
    try:
        done, arrays, strategy_state, torch_rng = load_checkpoint(cfg["resume"])
    except (FileNotFoundError, CheckpointError) as err:
        raise ConfigError(str(err)) from err
    path = Path(cfg["resume"]).expanduser()
    run_dir = path if path.is_dir() else path.parent.parent
    saved_file = run_dir / "config.yaml"
    if saved_file.is_file():
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
        for key, value in cfg.items():
            if key not in RESUMABLE_CHANGES and saved.get(key) != value:
                raise ConfigError(f"resume: {key}={value!r} differs from the interrupted run's {saved.get(key)!r}.")
    return done, arrays, strategy_state, torch_rng, run_dir
