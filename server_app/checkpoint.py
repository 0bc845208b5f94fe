"""Per-round checkpoints of the server: global arrays, round number, RNG and strategy state.

A checkpoint is a ``torch.save`` of plain tensors, ints, floats, strings, lists and
dicts, written atomically (temporary file + rename: a crash mid-write leaves the
previous checkpoint valid) and read back with ``torch.load(weights_only=True)``, so
loading one never runs code from the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord

from ddome_strategy.common_expert import save_atomically

CHECKPOINT_NAME = "last.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file."""


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns."""

    round: int
    """The last completed round."""
    arrays: ArrayRecord
    """The global gate and experts after that round."""
    strategy: dict
    """The strategy's ``state_dict()``."""
    torch_rng: torch.Tensor | None
    """The server's global torch RNG state (``torch.set_rng_state``), if saved."""


def checkpoint_path(run_dir: str | Path) -> Path:
    """Where a run folder keeps its latest checkpoint."""
    return Path(run_dir) / "checkpoints" / CHECKPOINT_NAME


def save_checkpoint(run_dir: str | Path, server_round: int, arrays: ArrayRecord, strategy_state: dict) -> Path:
    """Atomically replace the run's checkpoint.

    Parameters
    ----------
    run_dir : path
        The run folder; the checkpoint goes to ``checkpoints/last.pt`` in it.
    server_round : int
        The last completed round.
    arrays : ArrayRecord
        The global gate and experts after that round.
    strategy_state : dict
        ``DDOME.state_dict()`` (the client-sampling RNG state).

    Returns
    -------
    Path
        The checkpoint file.
    """
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "round": int(server_round),
        "arrays": arrays.to_torch_state_dict(),
        "strategy": strategy_state,
        "torch-rng": torch.get_rng_state(),
    }
    save_atomically(state, path)
    return path


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint (a file, or a run folder) without unpickling arbitrary objects.

    Parameters
    ----------
    path : path
        A run folder or its ``checkpoints/last.pt``.

    Returns
    -------
    Checkpoint
        The last completed round, the global arrays after it, the strategy state and
        the server's torch RNG state.

    Raises
    ------
    FileNotFoundError
        If there is no checkpoint at ``path``.
    CheckpointError
        If the file is not a checkpoint written by :func:`save_checkpoint` (including
        a pickle with arbitrary objects, which ``weights_only=True`` refuses to load).
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no checkpoint at {path}.")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # any failure means "not a valid checkpoint"
        raise CheckpointError(f"resume: {path} is not a valid checkpoint ({type(err).__name__}).") from err
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("round"), int)
        or state["round"] < 0
        or not isinstance(state.get("arrays"), dict)
        or not all(isinstance(v, torch.Tensor) for v in state["arrays"].values())
        or not isinstance(state.get("strategy"), dict)
    ):
        raise CheckpointError(f"resume: {path} is not a checkpoint written by this app.")
    rng = state.get("torch-rng")
    return Checkpoint(
        state["round"], ArrayRecord(state["arrays"]), state["strategy"], rng if isinstance(rng, torch.Tensor) else None
    )
