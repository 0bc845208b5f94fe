"""The deployed node's worker (ddome_strategy.worker): a run whose every message goes through
the nodes' workers ends exactly as the same run in one process; a worker that dies costs
its node one message and the run goes on."""

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from client_app.app import app as client_app
from ddome_strategy.worker import uses_worker
from server_app.app import run_ddome
from server_app.inprocess import InProcessGrid

# 3 experts (anchors 0-2), 1 normal and 1 test client: 5 nodes, so 5 workers.
SMALL = {
    "num-experts": 3,
    "top-k": 2,
    "num-train-clients": 4,
    "num-test-clients": 1,
    "labels-per-client": 6,
    "anchors-per-round": 3,
    "normal-per-round": 1,
    "num-server-rounds": 4,
    "eval-every": 2,
}


@pytest.fixture
def worker_dir(tmp_path, monkeypatch):
    """Workers' sockets and logs under tmp_path; every worker started is stopped after the test."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("DDOME_WORKER_IDLE_SECONDS", "60")
    folder = tmp_path / f"ddome-workers-{os.getuid()}"
    yield folder
    for log in folder.glob("*.log"):
        for pid in re.findall(r"worker (\d+) listening", log.read_text()):
            try:
                os.kill(int(pid), signal.SIGTERM)
            except ProcessLookupError:
                pass


def rows(summary) -> list[dict]:
    return [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]


def test_a_run_through_the_workers_ends_as_the_same_run_in_one_process(tiny_run_config, tmp_path, worker_dir):
    here = run_ddome(InProcessGrid(client_app, 5), tiny_run_config(tmp_path / "here", **SMALL))
    grid = InProcessGrid(client_app, 5, node_config={"worker": "true"})
    assert all(uses_worker(c) for c in grid.contexts.values())
    through = run_ddome(grid, tiny_run_config(tmp_path / "workers", **SMALL))
    assert len(list(worker_dir.glob("*.log"))) == 5  # one worker per node
    assert through["zero-shot-acc"] == here["zero-shot-acc"]
    losses = [r["train-loss"] for r in rows(here) if r["stage"] == "train"]
    assert len(losses) == 4
    assert [r["train-loss"] for r in rows(through) if r["stage"] == "train"] == pytest.approx(losses, rel=1e-6)


def test_a_worker_that_dies_costs_its_node_one_message(tiny_run_config, tmp_path, worker_dir, warnings_log):
    class KillingGrid(InProcessGrid):
        """Kills node 1003's worker (the normal client, trained every round) after round 2."""

        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            rounds = {int(m.content["config"].get("server-round", 0)) for m in messages if "config" in m.content}
            if 3 in rounds and not getattr(self, "killed", False):
                log = next(worker_dir.glob("node-1003-*.log"))
                os.kill(int(re.findall(r"worker (\d+) listening", log.read_text())[-1]), signal.SIGKILL)
                time.sleep(0.5)
                self.killed = True
            return super().send_and_receive(messages, timeout=timeout)

    grid = KillingGrid(client_app, 5, node_config={"worker": "true"})
    summary = run_ddome(grid, tiny_run_config(tmp_path, **SMALL))
    replies = {r["round"]: r["num-replies"] for r in rows(summary) if r["stage"] == "train"}
    assert sorted(replies) == [1, 2, 3, 4]
    assert replies[4] == replies[1] == 4  # back in round 4 with a new worker and its set-up resent
    assert replies[3] == 3
    log = "\n".join(warnings_log())
    # The new worker has none of the run: it says so, and the server resends the set-up.
    assert "node 1003: no client configuration on this node" in log, log
