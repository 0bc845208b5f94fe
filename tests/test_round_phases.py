"""A DDOME round in phases: the recorded figures of the code before the phases were made
explicit (issue 15), which the explicit rounds must reproduce to the digit; each phase's
byte count against the messages sent; named actions; the client configuration sent once."""

import json
from pathlib import Path

import pytest
from flwr.app import Error, Message, RecordDict

from benchmarks.compare import run_method
from client_app.app import app as client_app
from ddome_strategy import DDOME, layout_roles
from ddome_strategy.protocol import (
    CLIENT_CONFIG,
    COMMON_EXPERT,
    CONFIG,
    PER_ROUND_KEYS,
    PROTOCOL_VERSION,
    ROLE_QUERY,
    VERSION_KEY,
)
from server_app.app import run_ddome
from server_app.config import DEFAULTS, client_config, resolve
from server_app.inprocess import InProcessGrid, ensure_task_identity

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


def test_ddome_run_gives_the_recorded_figures(tmp_path, tiny_run_config):
    # The recorded code's rule and dispatch (it had no mixture, no generalist, top-K always)
    recorded_code = {"zero-shot-rule": "top1", "generalist": False, "dispatch-mass": 0.0}
    run_config = tiny_run_config(tmp_path, **recorded_code, **{"num-server-rounds": 4, "eval-every": 2})
    summary = run_ddome(InProcessGrid(client_app, NODES), run_config)
    for key, value in RECORDED_SUMMARY.items():
        assert summary[key] == value, key
    rows = [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["stage"] == "train"]
    # Losses are float sums whose last bits follow the CPU's vector code path (they moved by
    # 3e-9 between two machines); accuracies are counts and stay exact.
    assert [row["train-loss"] for row in train] == pytest.approx(RECORDED_TRAIN_LOSS, rel=1e-6)
    assert [row["bytes-total"] for row in train] == RECORDED_BYTES_TOTAL


def test_benchmark_baselines_give_the_recorded_figures(tmp_path, tiny_run_config, digits_benchmark):
    cfg, dataset, common = digits_benchmark("num-server-rounds=3", cache_dir=tiny_run_config(tmp_path)["cache-dir"])
    for method, recorded in RECORDED_BENCHMARK.items():
        result = run_method(method, cfg, dataset, common, lambda line: None, InProcessGrid(client_app, NODES))
        for key in ("zero-shot-acc", "train-clients-acc", "bytes-per-round"):
            assert result[key] == recorded[key], (method, key)
        assert [h["round"] for h in result["history"]] == [1, 2, 3], method
        assert [h["test/zero-shot-acc"] for h in result["history"]] == recorded["test"], method
        assert [h["train/zero-shot-acc"] for h in result["history"]] == recorded["train"], method


class PhaseRecordingGrid(InProcessGrid):
    """An in-process grid that records, for every exchange, its message type, round, the
    array bytes of the messages and of the replies, and which messages carried the client
    configuration. Like Flower's runtime, a ClientApp exception becomes an error reply;
    ``wipe`` = (node, round) loses that node's state when that round starts (a restart)."""

    def __init__(self, wipe: tuple[int, int] | None = None) -> None:
        super().__init__(client_app, NODES)
        self.wipe = wipe
        self.exchanges: list[tuple[str, int, int, int]] = []
        self.messages: list[Message] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.messages += messages
        rounds = {int(m.content[CONFIG]["server-round"]) for m in messages if CONFIG in m.content}
        if self.wipe is not None and self.wipe[1] in rounds:
            self.contexts[self.wipe[0]].state = RecordDict()
            self.wipe = None
        replies = []
        for m in messages:
            try:
                replies.append(self.client_app(m, self.contexts[m.metadata.dst_node_id]))
            except Exception as err:  # what Flower's ClientApp runtime does
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=m))
        (kind,) = {m.metadata.message_type for m in messages}
        count = lambda items: sum(
            r.count_bytes() for m in items if m.has_content() for r in m.content.array_records.values()
        )  # noqa: E731
        self.exchanges.append((kind, max(rounds, default=0), count(messages), count(replies)))
        return replies


def _run(tmp_path, tiny_run_config, grid, **overrides) -> list[dict]:
    summary = run_ddome(grid, tiny_run_config(tmp_path, **{"num-server-rounds": 4, "eval-every": 2, **overrides}))
    return [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]


def test_each_phase_counts_the_bytes_of_its_messages_and_replies(tmp_path, tiny_run_config):
    grid = PhaseRecordingGrid()
    rows = _run(tmp_path, tiny_run_config, grid)
    kinds = [kind for kind, *_ in grid.exchanges]
    # Named actions: one role query for the whole run, then per round route + train (+ route + evaluate).
    one_round, evaluation = ["query.route", "train"], ["query.route", "evaluate"]
    assert kinds == ["query.role", *one_round, *one_round, *evaluation, *one_round, *one_round, *evaluation]
    for server_round in range(1, 5):
        phases = [(kind, down + up) for kind, r, down, up in grid.exchanges if r == server_round]
        (train,) = [row for row in rows if row["round"] == server_round and row["stage"] == "train"]
        route_bytes, train_bytes = phases[0][1], phases[1][1]
        assert [kind for kind, _ in phases[:2]] == ["query.route", "train"]
        assert train["bytes/route"] == route_bytes and train["bytes/train"] == train_bytes
        assert train["bytes-total"] == route_bytes + train_bytes  # routing + training, not evaluation
        evaluate = [row for row in rows if row["round"] == server_round and row["stage"] == "evaluate"]
        if server_round % 2:
            assert len(phases) == 2 and not evaluate
        else:
            assert [kind for kind, _ in phases[2:]] == ["query.route", "evaluate"]
            assert evaluate[0]["bytes/evaluate"] == phases[2][1] + phases[3][1] > 0


def test_the_client_configuration_travels_once_per_node_and_only_per_round_values_after(tmp_path, tiny_run_config):
    grid = PhaseRecordingGrid()
    _run(tmp_path, tiny_run_config, grid, **{"num-server-rounds": 2})
    cfg = resolve({**DEFAULTS, "config-file": "configs/digits-tiny.yaml"})
    for node in grid.contexts:
        received = [m for m in grid.messages if m.metadata.dst_node_id == node]
        with_config = [m for m in received if CLIENT_CONFIG in m.content]
        assert len(with_config) == 1 and with_config[0] is received[1]  # after the role query
        # The run's client configuration and the protocol version (docs/protocol.md).
        assert dict(with_config[0].content[CLIENT_CONFIG]) == {**client_config(cfg), VERSION_KEY: PROTOCOL_VERSION}
        for m in received:
            assert set(m.content.config_records.get(CONFIG, {})) <= set(PER_ROUND_KEYS)


def test_a_node_that_lost_its_state_gets_the_configuration_again(tmp_path, tiny_run_config):
    # Anchor 2 (node 1002) restarts when round 2 starts: it fails once, then trains again.
    grid = PhaseRecordingGrid(wipe=(1002, 2))
    rows = _run(tmp_path, tiny_run_config, grid, **{"num-server-rounds": 3, "eval-every": 3})
    assert [row["num-replies"] for row in rows if row["stage"] == "train"] == [10, 9, 10]
    resent = [m for m in grid.messages if m.metadata.dst_node_id == 1002 and CLIENT_CONFIG in m.content]
    assert [int(m.content[CONFIG]["server-round"]) for m in resent] == [1, 3]
    assert all(COMMON_EXPERT in m.content for m in resent)


def test_a_client_configuration_that_would_shadow_a_per_round_value_is_refused():
    for key in PER_ROUND_KEYS:
        with pytest.raises(ValueError, match=f"client_config must not set '{key}'"):
            DDOME(5, layout_roles(5, 10), client_config={"lr": 0.1, key: 1})


def test_client_app_routes_named_actions_like_flower():
    # The ClientApp has one handler per message type; Flower dispatches on "<category>.<action>".
    assert set(client_app._registered_funcs) == {
        "query.role",
        "query.route",
        "train.default",
        "evaluate.default",
        "train.single",
        "evaluate.single",
        "evaluate.ensemble",
    }
    ensure_task_identity()
    context = InProcessGrid(client_app, 1).contexts[1000]
    reply = client_app(Message(RecordDict(), dst_node_id=1000, message_type=ROLE_QUERY), context)
    assert reply.content[CONFIG]["partition-id"] == 0
