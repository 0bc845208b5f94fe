"""End to end through Flower's simulation engine (Ray) on scikit-learn's digits."""

import json

import pytest
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client_app.app import app as client_app
from server_app.app import run_ddome
from server_app.config import DEFAULTS

NUM_CLIENTS = 10 + 3  # configs/digits-tiny.yaml: 10 training + 3 unseen test clients


@pytest.mark.simulation
def test_ddome_zero_shot_through_flower_simulation(tmp_path):
    summaries = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        run_config = {
            **DEFAULTS,
            "config-file": "configs/digits-tiny.yaml",
            "output-dir": str(tmp_path),
            "cache-dir": str(tmp_path / "cache"),
        }
        summaries.append(run_ddome(grid, run_config))

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    assert summaries, "the ServerApp did not finish"
    summary = summaries[0]
    # Ten classes, unseen label combinations: chance is ~25% (4 labels per client).
    assert summary["zero-shot-acc"] > 0.6
    assert summary["mixture-acc"] > 0.6
    assert 0.0 <= summary["routing-error"] <= 1.0
    run_dir = tmp_path / summary["output"].split("/")[-1]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["stage"] == "train"] == list(range(1, 11))
    assert all(r["num-replies"] == 10 for r in rows if r["stage"] == "train")
    assert (run_dir / "checkpoints" / "moe.pt").stat().st_size > 0
    assert (run_dir / "checkpoints" / "common_expert.pt").stat().st_size > 0
    assert (run_dir / "config.yaml").read_text().count("dataset: digits") == 1
