"""Reliability: client faults, bad configuration, checkpoint and resume, untrusted input."""

import json
import re
from pathlib import Path

import pytest
import torch
from flwr.app import Error, Message

from client_app.app import app as client_app
from server_app.app import run_ddome
from server_app.checkpoint import checkpoint_path, load_checkpoint
from server_app.config import DEFAULTS, ConfigError
from server_app.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parent.parent
TINY = {**DEFAULTS, "config-file": "configs/digits-tiny.yaml"}
NODES = 13


def run_config(tmp_path, **overrides):
    return {
        **TINY,
        "output-dir": str(tmp_path / "out"),
        "cache-dir": str(tmp_path.parent / "ddome-test-cache"),
        **overrides,
    }


class FaultyGrid(InProcessGrid):
    """Some nodes reply with an error, some never reply (dropped or timed out)."""

    def __init__(self, erring: set, silent: set) -> None:
        super().__init__(client_app, NODES)
        self.erring, self.silent = erring, silent

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            if pid in self.silent and message.content["config"]["ddome-task"] != "role":
                continue
            if pid in self.erring and message.content["config"]["ddome-task"] == "train":
                replies.append(Message(Error(code=0, reason="client crashed"), reply_to=message))
                continue
            replies.append(self.client_app(message, self.contexts[message.metadata.dst_node_id]))
        return replies


class InterruptedGrid(InProcessGrid):
    """Dies (like a server crash) when the round after ``die_after`` starts."""

    def __init__(self, die_after: int) -> None:
        super().__init__(client_app, NODES)
        self.die_after = die_after

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        rounds = {int(m.content["config"].get("server-round", 0)) for m in messages if "config" in m.content}
        if max(rounds, default=0) > self.die_after:
            raise KeyboardInterrupt("server killed")
        return super().send_and_receive(messages, timeout=timeout)


def metrics(summary):
    run_dir = Path(summary["output"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_goes_on_when_clients_fail_and_accuracy_still_rises(tmp_path):
    # Partition 1 is an anchor whose training always errors; 7 and 11 never answer.
    grid = FaultyGrid(erring={1, 6}, silent={7, 11})
    summary = run_ddome(grid, run_config(tmp_path, **{"experts-init": "random", "eval-every": 2}))
    rows = metrics(summary)
    trained = [r for r in rows if r["stage"] == "train"]
    evaluated = [r for r in rows if r["stage"] == "evaluate"]
    assert [r["round"] for r in trained] == list(range(1, 11))
    assert all(r["num-replies"] < 10 for r in trained)  # failed clients were left out
    assert evaluated[-1]["test/zero-shot-acc"] > evaluated[0]["test/zero-shot-acc"] + 0.1
    assert evaluated[-1]["test/num-clients"] == 2  # test client 11 never answered


def test_an_expert_whose_trainers_all_fail_keeps_its_weights(tmp_path):
    # Anchor 1 always fails; with no normal clients nobody else trains expert 1.
    grid = FaultyGrid(erring={1}, silent=set())
    summary = run_ddome(grid, run_config(tmp_path, **{"normal-per-round": 0, "num-server-rounds": 2}))
    run_dir = Path(summary["output"])
    initial = torch.load(run_dir / "checkpoints" / "common_expert.pt", weights_only=True)
    final = torch.load(run_dir / "checkpoints" / "moe.pt", weights_only=True)
    for key, value in initial.items():
        assert torch.equal(final[f"expert.1.{key}"], value)  # untouched: still the common expert
        assert not torch.equal(final[f"expert.0.{key}"], value)


def test_round_is_skipped_when_too_few_replies_arrive(tmp_path):
    grid = FaultyGrid(erring=set(range(10)), silent=set())
    summary = run_ddome(grid, run_config(tmp_path, **{"num-server-rounds": 2, "min-train-replies": 3}))
    assert all(r["num-replies"] == 0 for r in metrics(summary) if r["stage"] == "train")


class NoMessagesGrid:
    def get_node_ids(self):
        raise AssertionError("a bad configuration must stop before any message")

    send_and_receive = get_node_ids


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"top-k": 9}, "top-k"),
        ({"anchors-per-round": 7}, "anchors-per-round"),
        ({"dataset": "imagenet"}, "dataset"),
        ({"arch": "vit"}, "arch"),
        ({"data-root": "/nowhere"}, "data-root"),
        ({"resume": "/nowhere"}, "resume"),
    ],
)
def test_bad_configuration_stops_before_training(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        run_ddome(NoMessagesGrid(), run_config(tmp_path, **overrides))
    assert not (tmp_path / "out").exists()  # nothing written either


def test_interrupted_run_resumes_to_the_same_result(tmp_path):
    config = run_config(tmp_path, **{"num-server-rounds": 6, "eval-every": 3})
    uninterrupted = run_ddome(InProcessGrid(client_app, NODES), config)
    with pytest.raises(KeyboardInterrupt):
        run_ddome(InterruptedGrid(die_after=4), config)
    interrupted_dir = sorted((tmp_path / "out").iterdir())[-1]
    assert load_checkpoint(interrupted_dir)[0] == 4
    resumed = run_ddome(InProcessGrid(client_app, NODES), {**config, "resume": str(interrupted_dir)})
    assert resumed["output"] == str(interrupted_dir)
    assert resumed["zero-shot-acc"] == uninterrupted["zero-shot-acc"]
    a = torch.load(Path(uninterrupted["output"]) / "checkpoints" / "moe.pt", weights_only=True)
    b = torch.load(interrupted_dir / "checkpoints" / "moe.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical experts and gate
    assert [r["round"] for r in metrics(resumed) if r["stage"] == "train"] == list(range(1, 7))
    with pytest.raises(ConfigError, match="seed"):
        run_ddome(InProcessGrid(client_app, NODES), {**config, "resume": str(interrupted_dir), "seed": 5})


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    config = run_config(tmp_path, **{"num-server-rounds": 2})
    summary = run_ddome(InProcessGrid(client_app, NODES), config)
    path = checkpoint_path(Path(summary["output"]))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("torch.save", crash)
    from server_app.checkpoint import save_checkpoint

    with pytest.raises(OSError):
        save_checkpoint(path.parent.parent, 3, load_checkpoint(path)[1], {})
    assert path.read_bytes() == before and load_checkpoint(path)[0] == 2
    assert not list(path.parent.glob("*.tmp"))


def test_nothing_is_unpickled_unsafely():
    sources = [
        p
        for d in ("ddome_strategy", "client_app", "server_app", "data", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
    ]
    for source in sources:
        text = source.read_text()
        assert "import pickle" not in text, source
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{source}: {call}"
