"""A DDOME round in phases: the recorded figures of the code before the phases were made
explicit (issue 15), which the explicit rounds must reproduce to the digit."""

import json
from pathlib import Path

from benchmarks.compare import parse_args, resolve_config, run_method
from client_app.app import app as client_app
from server_app.app import build_common_expert, run_ddome
from server_app.config import DEFAULTS
from server_app.inprocess import InProcessGrid

NODES = 13  # configs/digits-tiny.yaml: 10 training + 3 unseen test clients

# Recorded from the code before issue 15 (commit e0d9ea9) on the in-process grid.
RECORDED_SUMMARY = {
    "zero-shot-acc": 0.6859934528668722,
    "mixture-acc": 0.8928995132446289,
    "routing-error": 0.7428790728251139,
    "train-clients-acc": 0.8416666626930237,
    "bytes-per-round": 882950.0,
}
RECORDED_TRAIN_LOSS = [1.0451791799627244, 0.956359724374488, 0.9150976275559515, 0.8835025733802467]
RECORDED_BYTES_TOTAL = [1031420, 833460, 833460, 833460]
RECORDED_BENCHMARK = {
    "fedavg": {
        "zero-shot-acc": 0.8854307333628336,
        "train-clients-acc": 0.9116666595141093,
        "bytes-per-round": 395920.0,
        "test": [0.8632699052492777, 0.900204618771871, 0.8928176760673523],
        "train": [0.901666659116745, 0.9166666567325592, 0.9166666626930237],
    },
    "avg-ensembles": {
        "zero-shot-acc": 0.757386949327257,
        "train-clients-acc": 0.8461111058791478,
        "bytes-per-round": 653426.6666666666,
        "test": [0.7580110629399618, 0.776457945505778, 0.7376918395360311],
        "train": [0.8249999940395355, 0.8716666609048843, 0.8416666626930237],
    },
}


def _cache(tmp_path) -> str:
    return str(tmp_path.parent / "ddome-test-cache")


def test_ddome_run_gives_the_recorded_figures(tmp_path):
    run_config = {
        **DEFAULTS,
        "config-file": "configs/digits-tiny.yaml",
        "num-server-rounds": 4,
        "eval-every": 2,
        "output-dir": str(tmp_path / "out"),
        "cache-dir": _cache(tmp_path),
    }
    summary = run_ddome(InProcessGrid(client_app, NODES), run_config)
    for key, value in RECORDED_SUMMARY.items():
        assert summary[key] == value, key
    rows = [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["stage"] == "train"]
    assert [row["train-loss"] for row in train] == RECORDED_TRAIN_LOSS
    assert [row["bytes-total"] for row in train] == RECORDED_BYTES_TOTAL


def test_benchmark_baselines_give_the_recorded_figures(tmp_path):
    args = parse_args(
        [
            "--config-file",
            "configs/digits-tiny.yaml",
            "--run-config",
            "num-server-rounds=3",
            f"cache-dir={_cache(tmp_path)}",
        ]
    )
    cfg = resolve_config(args, 0)
    dataset, common, _ = build_common_expert(cfg)
    for method, recorded in RECORDED_BENCHMARK.items():
        result = run_method(method, cfg, dataset, common, lambda line: None, InProcessGrid(client_app, NODES))
        for key in ("zero-shot-acc", "train-clients-acc", "bytes-per-round"):
            assert result[key] == recorded[key], (method, key)
        assert [h["round"] for h in result["history"]] == [1, 2, 3], method
        assert [h["test/zero-shot-acc"] for h in result["history"]] == recorded["test"], method
        assert [h["train/zero-shot-acc"] for h in result["history"]] == recorded["train"], method
