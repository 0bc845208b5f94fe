"""One output folder per run: resolved config, metrics per round, checkpoints."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import yaml
from flwr.app import ArrayRecord

from ddome_strategy.common_expert import save_atomically


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class RunWriter:
    """Writes ``config.yaml``, ``metrics.jsonl`` and ``checkpoints/`` of a run.

    Metrics are appended (and flushed) as each round ends, so a crash loses nothing
    that was already reported.
    """

    def __init__(self, output_dir: str, cfg: dict[str, Any], run_dir: str | Path | None = None) -> None:
        if run_dir is not None:  # resuming: keep writing into the interrupted run's folder
            self.path = Path(run_dir).expanduser().resolve()
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.path = Path(output_dir).expanduser().resolve() / f"{stamp}-{cfg['dataset']}-seed{cfg['seed']}"
            suffix = 1
            while self.path.exists():
                self.path = self.path.with_name(f"{self.path.name}-{suffix}")
                suffix += 1
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        with (self.path / "config.yaml").open("w", encoding="utf-8") as handle:
            yaml.safe_dump(cfg, handle, sort_keys=True)
        self.metrics_file = self.path / "metrics.jsonl"
        self.history: list[dict[str, Any]] = []

    def keep_rounds_up_to(self, last_round: int) -> None:
        """On resume: keep the metrics of the checkpointed rounds, drop any later ones
        (written after the last checkpoint, before the interruption)."""
        if not self.metrics_file.exists():
            return
        rows = [json.loads(line) for line in self.metrics_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.history = [row for row in rows if row["round"] <= last_round]
        self.metrics_file.write_text("".join(json.dumps(row) + "\n" for row in self.history), encoding="utf-8")

    def log(self, server_round: int, stage: str, metrics: dict[str, Any]) -> None:
        """Append one line ``{"round", "stage", "time", **metrics}`` to ``metrics.jsonl``."""
        row = {
            "round": server_round,
            "stage": stage,
            "time": time.time(),
            **{k: _jsonable(v) for k, v in metrics.items()},
        }
        self.history.append(row)
        with self.metrics_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")

    def save_arrays(self, name: str, arrays: ArrayRecord) -> Path:
        """Save ``arrays`` as a torch state dict under ``checkpoints/<name>.pt``."""
        path = self.path / "checkpoints" / f"{name}.pt"
        save_atomically(arrays.to_torch_state_dict(), path)
        return path

    def save_summary(self, summary: dict[str, Any]) -> None:
        """Write ``summary.json``: the headline figures of the run."""
        with (self.path / "summary.json").open("w", encoding="utf-8") as handle:
            json.dump({k: _jsonable(v) for k, v in summary.items()}, handle, indent=2)
