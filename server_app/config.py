"""The run configuration: defaults, YAML presets, overrides and validation.

Precedence, lowest first: the defaults below (the same as ``[tool.flwr.app.config]``
in ``pyproject.toml``, which a test checks), then the preset named by ``config-file``,
then every key given with ``--run-config`` (Flower's ``override_config`` of the run,
even a value equal to its default; without it, the values that differ from their default).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from data import DATASETS, DIRICHLET_ANCHORS, EVALUATION_SPLITS, PARTITION_MODES
from ddome_strategy.models import ARCHITECTURES
from ddome_strategy.moe import ANCHOR_GATE_LOSSES, ZERO_SHOT_RULES

APP_DIR = Path(__file__).resolve().parent.parent

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 40,
    "config-file": "",
    "dataset": "fashion-mnist",
    "data-root": "",
    "labels": "",
    "input-shape": "",
    "input-mean": "",
    "input-std": "",
    "pixel-scale": 255.0,
    "anchor-labels": "",
    "public-data-path": "",
    "common-expert-path": "",
    "partition-mode": "grouped",
    "num-experts": 5,
    "top-k": 2,
    "top-k-min": 1,
    "dispatch-mass": 0.6,
    "generalist": True,
    "generalist-width": 0.7,
    "generalist-proximal-mu": 1.0,
    "generalist-lr-scale": 1.0,
    "anchor-gate-loss": "weigh-generalist",
    "zero-shot-rule": "blend",
    "num-train-clients": 20,
    "num-test-clients": 5,
    "labels-per-client": 4,
    "dirichlet-alpha": 0.1,
    "dirichlet-anchors": "literal",
    "samples-per-client": 500,
    "eval-samples-per-client": 200,
    "public-fraction": 0.1,
    "validation-fraction": 0.1,
    "evaluation-split": "test",
    "anchors-per-round": 5,
    "normal-per-round": 5,
    "arch": "mlp",
    "mlp-hidden": 128,
    "gate-hidden": 64,
    "common-expert-target-acc": 0.75,
    "common-expert-max-epochs": 20,
    "experts-init": "common",
    "lr": 0.03,
    "gate-lr": 0.003,
    "momentum": 0.9,
    "batch-size": 32,
    "local-epochs": 1,
    "eval-every": 5,
    "eval-last-rounds": 0,
    "eval-train-clients": True,
    "min-train-replies": 1,
    "round-timeout": 600.0,
    "seed": 0,
    "output-dir": "outputs",
    "cache-dir": "~/.cache/ddome",
    "resume": "",
    "verbose": False,
}

EXPERT_INITS = ("common", "random")


class ConfigError(ValueError):
    """A run configuration that cannot work; the message names the key."""


def _preset_path(name: str) -> Path:
    path = Path(name).expanduser()
    for candidate in (path, APP_DIR / path):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config-file {name!r} not found (looked in the working directory and {APP_DIR}).")


def load_preset(name: str) -> dict[str, Any]:
    """Read a YAML preset; every key must be a run-config key."""
    with _preset_path(name).open(encoding="utf-8") as handle:
        preset = yaml.safe_load(handle) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"config-file {name!r} must hold a mapping of run-config keys.")
    unknown = sorted(set(preset) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"config-file {name!r} has unknown key {unknown[0]!r}; valid keys are listed in the README.")
    return preset


def resolve(run_config: Mapping[str, Any], explicit: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Merge defaults, the preset and explicit overrides, then validate.

    Parameters
    ----------
    run_config : Mapping
        ``context.run_config`` of the ServerApp (pyproject defaults fused with the overrides).
    explicit : Mapping, optional
        The keys the user passed with ``--run-config`` (``grid.run.override_config``).
        Each of them beats the preset, even when equal to its default. Without it, only
        the values of ``run_config`` that differ from their default count as explicit,
        so ``batch-size=32`` (the default) cannot override a preset's ``batch-size``.

    Returns
    -------
    dict
        The complete, validated configuration.
    """
    unknown = sorted((set(run_config) | set(explicit or {})) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"Unknown run-config key {unknown[0]!r}.")
    # Values differing from their default stay overrides even with ``explicit``: a grid
    # that leaves override_config empty then behaves as without it.
    overrides = {k: v for k, v in run_config.items() if v != DEFAULTS[k]}
    overrides.update(explicit or {})
    preset = load_preset(overrides["config-file"]) if overrides.get("config-file") else {}
    cfg = {**DEFAULTS, **preset, **overrides}
    for key, value in cfg.items():
        default = DEFAULTS[key]
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}.")
    validate(cfg)
    return cfg


def validate(cfg: dict[str, Any]) -> None:
    """Stop with one sentence naming the key if the configuration cannot work."""
    choices = {
        "dataset": DATASETS,
        "arch": ARCHITECTURES,
        "partition-mode": PARTITION_MODES,
        "experts-init": EXPERT_INITS,
        "evaluation-split": EVALUATION_SPLITS,
        "zero-shot-rule": ZERO_SHOT_RULES,
        "dirichlet-anchors": DIRICHLET_ANCHORS,
        "anchor-gate-loss": ANCHOR_GATE_LOSSES,
    }
    for key, valid in choices.items():
        if cfg[key] not in valid:
            raise ConfigError(f"{key}={cfg[key]!r} is not one of {', '.join(valid)}.")
    m = cfg["num-experts"]
    checks = [
        (m >= 1, "num-experts must be at least 1"),
        (1 <= cfg["top-k"] <= m, f"top-k={cfg['top-k']} must be between 1 and num-experts={m}"),
        (1 <= cfg["top-k-min"] <= cfg["top-k"], f"top-k-min={cfg['top-k-min']} must be between 1 and top-k"),
        (0 <= cfg["dispatch-mass"] <= 1, "dispatch-mass must be in [0, 1] (0: always top-k experts)"),
        (0 < cfg["generalist-width"] <= 1, "generalist-width must be in (0, 1] (1: as wide as the experts)"),
        (cfg["generalist-proximal-mu"] >= 0, "generalist-proximal-mu must be at least 0 (0: no proximal term)"),
        (cfg["generalist-lr-scale"] > 0, "generalist-lr-scale must be positive (1: the generalist at lr)"),
        (
            cfg["num-train-clients"] >= m,
            f"num-train-clients={cfg['num-train-clients']} must be at least num-experts={m} (one anchor per expert)",
        ),
        (
            0 <= cfg["anchors-per-round"] <= m,
            f"anchors-per-round={cfg['anchors-per-round']} must be between 0 and the {m} anchor clients",
        ),
        (
            0 <= cfg["normal-per-round"] <= cfg["num-train-clients"] - m,
            f"normal-per-round={cfg['normal-per-round']} exceeds the {cfg['num-train-clients'] - m} normal clients",
        ),
        (
            cfg["anchors-per-round"] + cfg["normal-per-round"] >= 1,
            "anchors-per-round + normal-per-round must be at least 1",
        ),
        (cfg["num-test-clients"] >= 1, "num-test-clients must be at least 1"),
        (cfg["num-server-rounds"] >= 1, "num-server-rounds must be at least 1"),
        (cfg["eval-every"] >= 1, "eval-every must be at least 1"),
        (cfg["eval-last-rounds"] >= 0, "eval-last-rounds must be non-negative"),
        (0 < cfg["common-expert-target-acc"] <= 1, "common-expert-target-acc must be in (0, 1]"),
        (0 < cfg["public-fraction"] < 1, "public-fraction must be in (0, 1)"),
        (
            0 <= cfg["validation-fraction"] < 1 - cfg["public-fraction"],
            "validation-fraction must be non-negative and below 1 - public-fraction",
        ),
        (
            cfg["evaluation-split"] == "test" or cfg["validation-fraction"] > 0,
            "evaluation-split 'validation' needs validation-fraction > 0",
        ),
        (cfg["samples-per-client"] >= 1, "samples-per-client must be at least 1"),
        (cfg["batch-size"] >= 1, "batch-size must be at least 1"),
        (cfg["local-epochs"] >= 1, "local-epochs must be at least 1"),
        (cfg["lr"] > 0 and cfg["gate-lr"] >= 0, "lr must be positive and gate-lr non-negative"),
        (cfg["dirichlet-alpha"] > 0, "dirichlet-alpha must be positive"),
        (cfg["min-train-replies"] >= 0, "min-train-replies must be non-negative"),
    ]
    for ok, sentence in checks:
        if not ok:
            raise ConfigError(sentence + ".")
    if cfg["resume"] and not Path(cfg["resume"]).expanduser().exists():
        raise ConfigError(f"resume {cfg['resume']!r} does not exist.")
    if cfg["data-root"] and not Path(cfg["data-root"]).expanduser().exists():
        raise ConfigError(f"data-root {cfg['data-root']!r} does not exist.")
    validate_deployment(cfg)


def node_local(cfg: Mapping[str, Any]) -> bool:
    """Whether the server runs without the dataset: the common expert comes from
    ``public-data-path`` or ``common-expert-path``, the clients read their own folders."""
    return bool(cfg["public-data-path"] or cfg["common-expert-path"])


def validate_deployment(cfg: Mapping[str, Any]) -> None:
    """Check the keys of a run on node-local data (docs/deploy.md)."""
    from data.node_data import anchor_label_groups, spec_from_run_config

    if cfg["public-data-path"] and cfg["common-expert-path"]:
        raise ConfigError("set public-data-path or common-expert-path, not both.")
    if cfg["public-data-path"] and not Path(cfg["public-data-path"]).expanduser().is_dir():
        raise ConfigError(f"public-data-path {cfg['public-data-path']!r} is not a folder on the server.")
    if cfg["common-expert-path"] and not Path(cfg["common-expert-path"]).expanduser().is_file():
        raise ConfigError(f"common-expert-path {cfg['common-expert-path']!r} is not a file on the server.")
    spec = None
    if node_local(cfg) or cfg["labels"] or cfg["input-mean"] or cfg["input-std"] or cfg["input-shape"]:
        try:
            spec = spec_from_run_config(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    if cfg["anchor-labels"]:
        try:
            anchor_label_groups(cfg["anchor-labels"], cfg["num-experts"], spec.num_classes if spec else None)
        except ValueError as err:
            raise ConfigError(str(err)) from err


def client_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The entries every ClientApp needs (data, partition, models, optimiser)."""
    keys = (
        "dataset",
        "data-root",
        "partition-mode",
        "num-experts",
        "num-train-clients",
        "num-test-clients",
        "labels-per-client",
        "dirichlet-alpha",
        "samples-per-client",
        "eval-samples-per-client",
        "public-fraction",
        "validation-fraction",
        "evaluation-split",
        "dirichlet-anchors",
        "labels",
        "input-shape",
        "input-mean",
        "input-std",
        "pixel-scale",
        "anchor-labels",
        "zero-shot-rule",
        "generalist",
        "generalist-width",
        "generalist-proximal-mu",
        "generalist-lr-scale",
        "anchor-gate-loss",
        "arch",
        "mlp-hidden",
        "gate-hidden",
        "lr",
        "gate-lr",
        "momentum",
        "batch-size",
        "local-epochs",
        "seed",
    )
    return {k: cfg[k] for k in keys}
