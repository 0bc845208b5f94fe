"""A run draws its own pictures (accuracy, routing heatmap, traffic) and lists them in summary.json."""

import json
from pathlib import Path

import matplotlib.image
import numpy as np

from client_app.app import app as client_app
from server_app.app import run_ddome
from server_app.inprocess import InProcessGrid

NODES = 13  # configs/digits-tiny.yaml: 10 training + 3 unseen test clients
NUM_EXPERTS = 5


def test_run_writes_accuracy_routing_and_bytes_plots(tmp_path, tiny_run_config):
    run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 4, "eval-every": 2})
    summary = run_ddome(InProcessGrid(client_app, NODES), run_config)
    run_dir = Path(summary["output"])

    saved = json.loads((run_dir / "summary.json").read_text())
    # The headline is the configured rule's figure, the paper's top-1 of K beside it.
    assert saved["zero-shot-rule"] == "blend" and saved["zero-shot-acc"] == saved["blend-acc"]
    assert all(0 <= saved[f"{rule}-acc"] <= 1 for rule in ("top1", "mixture", "fallback", "confident"))
    assert saved["plots"] == {"accuracy": "accuracy.png", "routing": "routing.png", "bytes": "bytes.png"}
    for relative in saved["plots"].values():
        path = run_dir / relative
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 0  # not blank

    # The heatmap: one row per client evaluated at the last round, one column per expert.
    routing = json.loads((run_dir / "routing.json").read_text())
    matrix = np.asarray(routing["matrix"])
    # eval-train-clients: training clients are evaluated too; the last column is the generalist.
    assert matrix.shape == (NODES, NUM_EXPERTS + 1) and routing["generalist"] == NUM_EXPERTS
    assert (matrix >= 0).all() and np.allclose(matrix.sum(1), 1, atol=1e-3)
    assert [label.split()[0] for label in routing["clients"]] == ["anchor"] * 5 + ["normal"] * 5 + ["test"] * 3
    assert routing["clients"][0] == "anchor p0 (e0)" and routing["clients"][-1] == "test p12"
    # The frames are the experts each client was sent: its top-K gate scores of the
    # anchor-owned experts, and the generalist, which goes to every client.
    for scores, chosen in zip(matrix, routing["chosen"], strict=True):
        assert len(chosen) == 3 and chosen[-1] == NUM_EXPERTS
        assert set(chosen[:2]) == set(np.argsort(-scores[:NUM_EXPERTS], kind="stable")[:2])


def _run_logging(tmp_path, tiny_run_config, **overrides) -> list[str]:
    """Run the digits preset and return what the ``flwr`` logger let through."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        run_config = tiny_run_config(tmp_path, **{"num-server-rounds": 3, "eval-every": 3, **overrides})
        run_ddome(InProcessGrid(client_app, NODES), run_config)
    finally:
        logger.removeHandler(handler)
    return lines


def test_progress_shows_one_line_per_round_with_eta_and_hides_flower_dumps_unless_verbose(tmp_path, tiny_run_config):
    lines = _run_logging(tmp_path, tiny_run_config)
    rounds = [line for line in lines if line.startswith("round ") and "ETA" in line]
    assert [line.split()[1] for line in rounds] == ["1/3", "2/3", "3/3"]
    assert all("train loss" in line and "routing acc" in line and " MB " in line for line in rounds)
    assert rounds[-1].endswith("ETA 0m00s")
    assert not any("Aggregated MetricRecord" in line or line.startswith("[ROUND") for line in lines)
    assert "Final results:" not in lines
    verbose = _run_logging(tmp_path, tiny_run_config, verbose=True)
    assert sum("Aggregated MetricRecord" in line for line in verbose) >= 3 and "Final results:" in verbose
