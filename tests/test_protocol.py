"""The written reply contract (docs/protocol.md): each rule's rejection, named in the log,
and rounds whose every reply is rejected end with a warning saying why."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from ddome_strategy import DDOME, layout_roles
from ddome_strategy.protocol import (
    ARRAYS,
    CLIENT_CONFIG,
    CONFIG,
    EVALUATE,
    METRICS,
    PROTOCOL_VERSION,
    ROLE_QUERY,
    ROUTE_QUERY,
    RULE_ANCHOR_EXPERT,
    RULE_EVAL_EXAMPLES,
    RULE_GATE_SCORES,
    RULE_METRICS_RECORD,
    RULE_PARTITION_ID,
    RULE_ROLE,
    RULE_ROLE_CONFIG,
    RULE_SAME_ARRAYS,
    RULE_TRAIN_ARRAYS,
    RULE_TRAIN_EXAMPLES,
    RULE_TRAIN_NUMBERS,
    RULE_ZERO_SHOT,
    TRAIN,
    VERSION_KEY,
    check_version,
    reply_problem,
)

M = 4
NODE_IDS = [9001 + 7919 * i for i in range(10)]  # partition ids 0..3 anchors, 4..7 normal, 8..9 test
BAD_PID = 5  # a normal client
BAD_NODE = NODE_IDS[BAD_PID]
TAG = f"node {BAD_NODE} [normal, partition-id {BAD_PID}]"


def global_arrays():
    arrays = {"gate.w": Array(np.zeros(3, np.float32))}
    arrays.update({f"expert.{i}.w": Array(np.full(2, float(i), np.float32)) for i in range(M)})
    return ArrayRecord(arrays)


def good_reply(partition_id: int, message: Message) -> RecordDict:
    """The minimal valid reply of each message type (those of docs/protocol.md)."""
    kind = message.metadata.message_type
    if kind == ROLE_QUERY:
        return RecordDict({CONFIG: ConfigRecord({"partition-id": partition_id})})
    if kind == ROUTE_QUERY:
        return RecordDict({METRICS: MetricRecord({"gate-scores": [1 / M] * M})})
    if kind == TRAIN:
        update = {k: Array(v.numpy() + 1) for k, v in message.content[ARRAYS].items()}
        return RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord({"num-examples": 10})})
    return RecordDict({METRICS: MetricRecord({"num-examples": 5, "zero-shot-acc": 0.5})})


class Client:
    """Replies with :func:`good_reply`, except that ``bad(message)`` replaces the content of
    its replies to messages of type ``bad_type``; records what it received."""

    def __init__(self, partition_id, bad_type=None, bad=None):
        self.partition_id, self.bad_type, self.bad = partition_id, bad_type, bad
        self.received = []

    def __call__(self, message):
        self.received.append(message)
        if message.metadata.message_type == self.bad_type:
            return Message(self.bad(message), reply_to=message)
        return Message(good_reply(self.partition_id, message), reply_to=message)


def run(fake_grid_class, bad_type=None, bad=None, bad_pids=(BAD_PID,), rounds=1, **options):
    clients = {node: Client(pid, bad_type if pid in bad_pids else None, bad) for pid, node in enumerate(NODE_IDS)}
    settings = dict(top_k=2, anchors_per_round=M, normal_per_round=4, eval_every=1, seed=0)
    strategy = DDOME(M, layout_roles(M, 8), **{**settings, **options})
    result = strategy.start(fake_grid_class(clients), global_arrays(), num_rounds=rounds)
    return strategy, result, clients


def rejection(warnings_log, start: str) -> str:
    (line,) = [m for m in warnings_log() if m.startswith(start)]
    return line


# ---------------------------------------------------------------- query.role


@pytest.mark.parametrize(
    ("content", "rule", "detail"),
    [
        (RecordDict({METRICS: MetricRecord({"partition-id": 5})}), RULE_ROLE_CONFIG, "found MetricRecord 'metrics'"),
        (RecordDict({CONFIG: ConfigRecord({"id": 5})}), RULE_ROLE_CONFIG, "it holds ['id']"),
        (RecordDict({CONFIG: ConfigRecord({"partition-id": "5"})}), RULE_PARTITION_ID, "got '5'"),
        (RecordDict({CONFIG: ConfigRecord({"role": "boss"})}), RULE_ROLE, "got 'boss'"),
        (RecordDict({CONFIG: ConfigRecord({"role": "anchor"})}), RULE_ANCHOR_EXPERT, "got None, num-experts=4"),
        (RecordDict({CONFIG: ConfigRecord({"role": "anchor", "expert": 4})}), RULE_ANCHOR_EXPERT, "got 4"),
    ],
)
def test_a_role_reply_that_breaks_a_rule_leaves_the_node_out_naming_the_rule(
    fake_grid_class, warnings_log, content, rule, detail
):
    strategy, _, clients = run(fake_grid_class, ROLE_QUERY, lambda m: content)
    assert BAD_NODE not in strategy.clients and len(strategy.clients) == 9
    line = rejection(warnings_log, f"node {BAD_NODE}: role query reply")  # its role is unknown: no tag
    assert f"breaks protocol rule '{rule}' ({detail}" in line and "left out" in line
    assert not any(m.metadata.message_type == TRAIN for m in clients[BAD_NODE].received)


# ---------------------------------------------------------------- query.route


@pytest.mark.parametrize(
    ("content", "rule", "detail"),
    [
        (
            RecordDict({"scores": MetricRecord({"gate-scores": [0.25] * M})}),
            RULE_METRICS_RECORD,
            "MetricRecord 'scores'",
        ),
        (RecordDict({METRICS: ConfigRecord({"gate-scores": [0.25] * M})}), RULE_METRICS_RECORD, "is a ConfigRecord"),
        (RecordDict({METRICS: MetricRecord({"gate-scores": [0.5, 0.5]})}), RULE_GATE_SCORES, "shape (2,)"),
        (RecordDict({METRICS: MetricRecord({"scores": [0.25] * M})}), RULE_GATE_SCORES, "no gate-scores"),
    ],
)
def test_a_routing_reply_that_breaks_a_rule_is_not_trained_and_the_rule_is_named(
    fake_grid_class, warnings_log, content, rule, detail
):
    _, result, clients = run(fake_grid_class, ROUTE_QUERY, lambda m: content, eval_every=5)
    line = rejection(warnings_log, f"{TAG}: routing reply breaks protocol rule '{rule}'")
    assert detail in line and "left out of round 1" in line
    assert not any(m.metadata.message_type == TRAIN for m in clients[BAD_NODE].received)
    assert result.train_metrics_clientapp[1]["num-replies"] == M + 3


# ---------------------------------------------------------------- train


def trained(message):
    return ArrayRecord({k: Array(v.numpy() + 1) for k, v in message.content[ARRAYS].items()})


def train_reply(arrays=True, record=METRICS, **metrics):
    def bad(message):
        content = RecordDict({record: MetricRecord(metrics)})
        if arrays:
            content[ARRAYS] = trained(message)
        return content

    return bad


def wrong_arrays(message):
    update = {k: Array(v.numpy().astype(np.float64)) for k, v in message.content[ARRAYS].items()}
    return RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord({"num-examples": 10})})


@pytest.mark.parametrize(
    ("bad", "rule", "detail"),
    [
        (
            train_reply(record="train-metrics", **{"num-examples": 10}),
            RULE_METRICS_RECORD,
            "MetricRecord 'train-metrics'",
        ),
        (train_reply(**{"train-loss": 0.3}), RULE_TRAIN_EXAMPLES, "no num-examples among ['train-loss']"),
        (train_reply(**{"num-examples": 10.0}), RULE_TRAIN_EXAMPLES, "got 10.0"),
        (train_reply(**{"num-examples": [10]}), RULE_TRAIN_EXAMPLES, "got [10]"),
        (train_reply(**{"num-examples": 0}), RULE_TRAIN_EXAMPLES, "got 0"),
        (train_reply(**{"num-examples": 10, "train-loss": [0.3, 0.2]}), RULE_TRAIN_NUMBERS, "train-loss"),
        (train_reply(arrays=False, **{"num-examples": 10}), RULE_TRAIN_ARRAYS, "found MetricRecord 'metrics'"),
        (wrong_arrays, RULE_SAME_ARRAYS, "float64"),
    ],
)
def test_a_train_reply_that_breaks_a_rule_is_rejected_naming_the_rule(fake_grid_class, warnings_log, bad, rule, detail):
    _, result, _ = run(fake_grid_class, TRAIN, bad, eval_every=5)
    line = rejection(warnings_log, f"{TAG}: train reply breaks protocol rule '{rule}'")
    assert detail in line and "not aggregated in round 1" in line
    assert result.train_metrics_clientapp[1]["num-replies"] == M + 3


def test_the_log_line_of_a_missing_num_examples_reads_as_documented(fake_grid_class, warnings_log):
    run(fake_grid_class, TRAIN, train_reply(**{"train-loss": 0.3}), eval_every=5)
    rule = 'metrics record "metrics" holds num-examples (int > 0)'
    assert any(m.startswith(f"{TAG}: train reply breaks protocol rule '{rule}'") for m in warnings_log())


# ---------------------------------------------------------------- evaluate


@pytest.mark.parametrize(
    ("metrics", "record", "rule", "detail"),
    [
        ({"num-examples": 5, "zero-shot-acc": 0.9}, "eval", RULE_METRICS_RECORD, "MetricRecord 'eval'"),
        ({"zero-shot-acc": 0.9}, METRICS, RULE_EVAL_EXAMPLES, "no num-examples"),
        ({"num-examples": 5, "top1-acc": 0.9}, METRICS, RULE_ZERO_SHOT, "got None"),
        ({"num-examples": 5, "zero-shot-acc": [0.9]}, METRICS, RULE_ZERO_SHOT, "got [0.9]"),
    ],
)
def test_an_evaluate_reply_that_breaks_a_rule_is_left_out_of_the_means(
    fake_grid_class, warnings_log, metrics, record, rule, detail
):
    _, result, _ = run(fake_grid_class, EVALUATE, lambda m: RecordDict({record: MetricRecord(metrics)}))
    line = rejection(warnings_log, f"{TAG}: evaluate reply breaks protocol rule '{rule}'")
    assert detail in line and "left out of round 1" in line
    evaluation = result.evaluate_metrics_clientapp[1]
    assert evaluation["train/num-clients"] == 7 and evaluation["train/zero-shot-acc"] == 0.5  # 8 training clients
    assert evaluation["test/num-clients"] == 2


# ---------------------------------------------------------------- rounds with no valid reply


@pytest.mark.parametrize("min_train_replies", [0, 1])
def test_a_round_whose_every_train_reply_is_rejected_is_skipped_with_the_reason(
    fake_grid_class, warnings_log, min_train_replies
):
    bad = train_reply(**{"train-loss": 0.3})  # no num-examples
    strategy, result, _ = run(
        fake_grid_class, TRAIN, bad, bad_pids=range(10), eval_every=5, min_train_replies=min_train_replies
    )
    (skipped,) = [m for m in warnings_log() if m.startswith("round 1 skipped")]
    assert "0 valid replies" in skipped and "8 replies rejected for breaking the protocol" in skipped
    assert f"protocol rule '{RULE_TRAIN_EXAMPLES}'" in skipped
    # Not a success that aggregated nothing: no round's arrays, and the run says so.
    assert len(result.arrays) == 0 and result.train_metrics_clientapp[1]["num-replies"] == 0
    assert np.array_equal(strategy.arrays["expert.1.w"].numpy(), np.full(2, 1.0, np.float32))
    assert any(m.startswith("no round from 1 to 1 aggregated a valid update") for m in warnings_log())


def test_a_round_whose_every_evaluate_reply_is_rejected_says_so(fake_grid_class, warnings_log):
    bad = lambda m: RecordDict({METRICS: MetricRecord({"accuracy": 0.9})})  # noqa: E731
    _, result, _ = run(fake_grid_class, EVALUATE, bad, bad_pids=range(10))
    assert 1 not in result.evaluate_metrics_clientapp
    (line,) = [m for m in warnings_log() if m.startswith("round 1: no evaluation metrics")]
    assert "10 replies rejected for breaking the protocol" in line and RULE_EVAL_EXAMPLES in line


# ---------------------------------------------------------------- the contract itself


def test_the_client_configuration_carries_the_protocol_version(fake_grid_class):
    _, _, clients = run(fake_grid_class)
    for client in clients.values():
        (first,) = [m for m in client.received if CLIENT_CONFIG in m.content]
        assert first.content[CLIENT_CONFIG][VERSION_KEY] == PROTOCOL_VERSION == "1.0"
    with pytest.raises(ValueError, match=f"must not set '{VERSION_KEY}'"):
        DDOME(M, layout_roles(M, 8), client_config={VERSION_KEY: "0.9"})


def test_the_documented_minimal_replies_follow_the_protocol():
    sent = global_arrays()
    message = Message(RecordDict({ARRAYS: sent}), dst_node_id=1, message_type=MessageType.TRAIN)
    replies = {
        ROLE_QUERY: [
            RecordDict({CONFIG: ConfigRecord({"partition-id": 7})}),
            RecordDict({CONFIG: ConfigRecord({"role": "anchor", "expert": 2})}),
            RecordDict({CONFIG: ConfigRecord({"role": "test"})}),
        ],
        ROUTE_QUERY: [RecordDict({METRICS: MetricRecord({"gate-scores": [0.7, 0.1, 0.1, 0.1]})})],
        TRAIN: [good_reply(0, message)],
        EVALUATE: [RecordDict({METRICS: MetricRecord({"num-examples": 0, "zero-shot-acc": float("nan")})})],
    }
    for kind, contents in replies.items():
        for content in contents:
            assert reply_problem(kind, content, num_experts=M, sent=sent) is None, (kind, content)


def test_a_client_refuses_a_server_of_another_major_protocol_version():
    check_version({VERSION_KEY: PROTOCOL_VERSION})
    check_version({VERSION_KEY: "1.7"})
    check_version({})  # a server from before the protocol was versioned
    with pytest.raises(ValueError, match="protocol 2.0, this ClientApp 1.0"):
        check_version({VERSION_KEY: "2.0"})
