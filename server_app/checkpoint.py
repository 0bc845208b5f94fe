"""Per-round checkpoints of the server: global arrays, round number, strategy state."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ArrayRecord

from ddome_strategy.common_expert import save_atomically

CHECKPOINT_NAME = "last.pt"


def checkpoint_path(run_dir: Path) -> Path:
    """Where a run folder keeps its latest checkpoint."""
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy_state: dict) -> Path:
    """Atomically replace the run's checkpoint: a crash mid-write keeps the previous one."""
    path = checkpoint_path(run_dir)
    state = {"round": server_round, "arrays": arrays.to_torch_state_dict(), "strategy": strategy_state}
    save_atomically(state, path)
    return path


def load_checkpoint(path: str | Path) -> tuple[int, ArrayRecord, dict]:
    """Load a checkpoint (a file, or a run folder) without unpickling arbitrary objects.

    Returns
    -------
    tuple[int, ArrayRecord, dict]
        The last completed round, the global arrays after it, and the strategy state.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}.")
    state = torch.load(path, weights_only=True)
    return int(state["round"]), ArrayRecord(state["arrays"]), state["strategy"]
