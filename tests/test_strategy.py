"""The DDOME strategy against scripted clients: roles, routing, dispatch, aggregation."""

import inspect

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy
from hypothesis import given, settings
from hypothesis import strategies as st

from ddome_strategy import DDOME, aggregate_moe, layout_roles
from ddome_strategy.arrays import experts_in
from ddome_strategy.strategy import (
    ARRAYS,
    CLIENT_CONFIG,
    COMMON_EXPERT,
    CONFIG,
    METRICS,
    ROLE_QUERY,
    ROUTE_QUERY,
    sent_arrays,
)

M, K = 4, 2


def global_arrays(value=0.0):
    arrays = {"gate.w": Array(np.full(3, value, np.float32))}
    for i in range(M):
        arrays[f"expert.{i}.w"] = Array(np.full(2, value + i, np.float32))
    return ArrayRecord(arrays)


class ScriptedClient:
    """Replies like a ClientApp: its partition id, fixed gate scores, fixed updates."""

    def __init__(self, partition_id, scores=None, fail_train=False):
        self.partition_id = partition_id
        self.scores = scores if scores is not None else np.full(M, 1 / M)
        self.fail_train = fail_train
        self.received = []

    def __call__(self, message):
        self.received.append(message)
        kind = message.metadata.message_type
        if kind == ROLE_QUERY:
            return Message(RecordDict({CONFIG: ConfigRecord({"partition-id": self.partition_id})}), reply_to=message)
        cfg = message.content[CONFIG]
        if kind == ROUTE_QUERY:
            return Message(
                RecordDict({METRICS: MetricRecord({"gate-scores": list(map(float, self.scores))})}), reply_to=message
            )
        if kind == MessageType.TRAIN:
            if self.fail_train:
                update = ArrayRecord({"gate.w": Array(np.full(3, np.nan, np.float32))})
            else:
                update = ArrayRecord(
                    {
                        k: Array(np.full(v.shape, 100.0 + self.partition_id, np.float32))
                        for k, v in message.content[ARRAYS].items()
                    }
                )
            metrics = {"num-examples": 10 * (self.partition_id + 1), "train-loss": 1.0}
            if cfg["role"] == "anchor":
                metrics["routing-acc"] = 0.5
            return Message(RecordDict({ARRAYS: update, METRICS: MetricRecord(metrics)}), reply_to=message)
        return Message(
            RecordDict({METRICS: MetricRecord({"zero-shot-acc": self.partition_id / 10, "num-examples": 5})}),
            reply_to=message,
        )


def make_federation(fake_grid_class, node_ids, scores_of=None, failing=()):
    # Partition ids 0..3 anchors, 4..7 normal, 8..9 test; node ids are arbitrary.
    clients = {
        node: ScriptedClient(pid, (scores_of or {}).get(pid), fail_train=pid in failing)
        for pid, node in enumerate(node_ids)
    }
    return fake_grid_class(clients), clients


def make_strategy(**kw):
    options = dict(
        top_k=K,
        anchors_per_round=2,
        normal_per_round=3,
        common_expert=ArrayRecord({"w": Array(np.ones(1, np.float32))}),
        seed=0,
    )
    options.update(kw)
    return DDOME(M, layout_roles(M, 8), **options)


NODE_IDS = [9001 + 7919 * i for i in range(10)]  # random-looking, as in a deployment


def test_roles_are_learned_from_partition_ids(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    strategy = make_strategy()
    strategy.discover(grid)
    roles = {c.partition_id: (c.role, c.expert) for c in strategy.clients.values()}
    assert roles[2] == ("anchor", 2)
    assert roles[5] == ("normal", -1)
    assert roles[9] == ("test", -1)
    assert strategy.clients[NODE_IDS[3]].partition_id == 3


def test_each_client_gets_gate_plus_only_its_experts(fake_grid_class):
    scores = {4: [0.1, 0.6, 0.1, 0.2], 5: [0.7, 0.1, 0.15, 0.05], 6: [0.0, 0.1, 0.5, 0.4], 7: [0.3, 0.3, 0.3, 0.1]}
    grid, clients = make_federation(fake_grid_class, NODE_IDS, scores_of={k: np.array(v) for k, v in scores.items()})
    strategy = make_strategy()
    strategy.start(grid, global_arrays(), num_rounds=1, evaluate_config=None)
    expected_topk = {4: [1, 3], 5: [0, 2], 6: [2, 3], 7: [0, 1]}
    trained = 0
    for client in clients.values():
        for message in client.received:
            if message.metadata.message_type != MessageType.TRAIN:
                continue
            trained += 1
            experts = experts_in(message.content[ARRAYS])
            assert "gate.w" in message.content[ARRAYS]
            if client.partition_id < M:
                assert experts == [client.partition_id]  # anchors: their own expert only
            else:
                assert experts == sorted(expected_topk[client.partition_id])
                assert list(message.content[CONFIG]["experts"]) == expected_topk[client.partition_id]
    assert trained == 2 + 3


def test_common_expert_is_sent_once_per_node(fake_grid_class):
    grid, clients = make_federation(fake_grid_class, NODE_IDS)
    make_strategy(eval_every=1).start(grid, global_arrays(), num_rounds=3)
    for client in clients.values():
        with_ce = [m for m in client.received if COMMON_EXPERT in m.content]
        assert len(with_ce) == 1
        first_payload = next(m for m in client.received if m.metadata.message_type != ROLE_QUERY)
        assert COMMON_EXPERT in first_payload.content
        # The client configuration too: once, with the first message that is not the role query.
        with_config = [m for m in client.received if CLIENT_CONFIG in m.content]
        assert with_config == [first_payload]


def test_aggregation_is_per_expert_and_untrained_experts_are_unchanged(fake_grid_class):
    # Only anchors train (no normal clients), anchor 0 and 1 are sampled.
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    strategy = make_strategy(anchors_per_round=2, normal_per_round=0, seed=3)
    result = strategy.start(grid, global_arrays(), num_rounds=1)
    trainers = {m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type == MessageType.TRAIN}
    sampled = sorted(strategy.clients[n].partition_id for n in trainers)
    assert len(sampled) == 2
    arrays = result.arrays
    weights = {pid: 10 * (pid + 1) for pid in sampled}
    gate_expected = sum((100.0 + p) * w for p, w in weights.items()) / sum(weights.values())
    assert arrays["gate.w"].numpy() == pytest.approx(np.full(3, gate_expected))
    for i in range(M):
        value = 100.0 + i if i in sampled else float(i)
        assert arrays[f"expert.{i}.w"].numpy() == pytest.approx(np.full(2, value))


def test_bad_updates_never_reach_the_aggregate(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS, failing=set(range(8)))
    strategy = make_strategy(min_train_replies=1)
    result = strategy.start(grid, global_arrays(), num_rounds=1)
    assert len(result.arrays) == 0  # the round was skipped: no new global arrays
    assert strategy.arrays["gate.w"].numpy() == pytest.approx(np.zeros(3))
    assert result.train_metrics_clientapp[1]["num-replies"] == 0


def test_byte_accounting_matches_arrays_sent(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    strategy = make_strategy()
    result = strategy.start(grid, global_arrays(), num_rounds=1)
    # The training phase (role query, routing, training) ends with the last TRAIN message.
    last_train = max(i for i, m in enumerate(grid.sent) if m.metadata.message_type == MessageType.TRAIN)
    down = sum(r.count_bytes() for m in grid.sent[: last_train + 1] for r in m.content.array_records.values())
    assert down > 0
    assert result.train_metrics_clientapp[1]["bytes-down"] == down


def test_evaluation_reports_test_and_training_clients_separately(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    result = make_strategy(eval_every=1).start(grid, global_arrays(), num_rounds=1)
    metrics = result.evaluate_metrics_clientapp[1]
    assert metrics["test/zero-shot-acc"] == pytest.approx((0.8 + 0.9) / 2)
    assert metrics["test/num-clients"] == 2
    assert metrics["train/num-clients"] == 8


def test_invalid_top_k_is_refused():
    with pytest.raises(ValueError, match="top_k"):
        DDOME(3, layout_roles(3, 5), top_k=4)


class BadClient(ScriptedClient):
    """Sends a malformed role or routing reply."""

    def __init__(self, partition_id, bad_role=None, bad_scores=None):
        super().__init__(partition_id)
        self.bad_role, self.bad_scores = bad_role, bad_scores

    def __call__(self, message):
        kind = message.metadata.message_type
        if kind == ROLE_QUERY and self.bad_role is not None:
            self.received.append(message)
            return Message(RecordDict({CONFIG: ConfigRecord({"partition-id": self.bad_role})}), reply_to=message)
        if kind == ROUTE_QUERY and self.bad_scores is not None:
            self.received.append(message)
            return Message(RecordDict({METRICS: MetricRecord({"gate-scores": self.bad_scores})}), reply_to=message)
        return super().__call__(message)


@pytest.mark.parametrize(
    ("bad_role", "bad_scores"),
    [("three", None), (-1, None), (None, [0.5, 0.5]), (None, [float("nan")] * M)],
)
def test_malformed_role_or_routing_replies_leave_the_client_out(fake_grid_class, bad_role, bad_scores):
    grid, clients = make_federation(fake_grid_class, NODE_IDS)
    # The node of normal partition 5 misbehaves; everything else is as usual.
    bad_node = NODE_IDS[5]
    clients[bad_node] = BadClient(5, bad_role, bad_scores)
    grid.handlers[bad_node] = clients[bad_node]
    strategy = make_strategy(normal_per_round=4)
    result = strategy.start(grid, global_arrays(), num_rounds=2)
    assert not any(m.metadata.message_type == MessageType.TRAIN for m in clients[bad_node].received)
    assert all(result.train_metrics_clientapp[r]["num-replies"] >= 5 for r in (1, 2))


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(list(range(4))), weights=st.lists(st.integers(1, 50), min_size=4, max_size=4))
def test_aggregation_does_not_depend_on_reply_order(order, weights):
    current = global_arrays()
    updates = [
        (
            ArrayRecord(
                {
                    "gate.w": Array(np.full(3, float(i), np.float32)),
                    f"expert.{i}.w": Array(np.full(2, 10.0 * i, np.float32)),
                }
            ),
            float(w),
        )
        for i, w in enumerate(weights)
    ]
    a = aggregate_moe(current, updates)
    b = aggregate_moe(current, [updates[i] for i in order])
    for key in a:
        assert np.allclose(a[key].numpy(), b[key].numpy(), atol=1e-5)


# Float32 values whose float sum depends on its order: 1e20 + 1 loses the 1, -1e20 + 1 too.
ORDER_SENSITIVE = {0: 1e20, 1: 1.0, 2: -1e20}


def _aggregate_in_order(fake_grid_class, order):
    """Train and evaluate replies of partitions 0..9, handed to the strategy in ``order``."""
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    strategy = make_strategy(anchors_per_round=M, normal_per_round=4)
    strategy.discover(grid)
    anchors, normals = strategy.sample(grid)
    routing = strategy.route(grid, normals, 1, global_arrays())
    sent = strategy.configure_train(1, global_arrays(), ConfigRecord(), anchors=anchors, routing=routing)
    by_pid = {strategy.clients[m.metadata.dst_node_id].partition_id: m for m in sent}
    assert sorted(by_pid) == list(range(8))
    train_replies = []
    for pid in (p for p in order if p in by_pid):
        value = ORDER_SENSITIVE.get(pid, 0.0)
        update = {k: Array(np.full(v.shape, value, np.float32)) for k, v in by_pid[pid].content[ARRAYS].items()}
        metrics = {"num-examples": 1, "train-loss": value, "routing-acc": value}
        train_replies.append(
            Message(RecordDict({ARRAYS: ArrayRecord(update), METRICS: MetricRecord(metrics)}), reply_to=by_pid[pid])
        )
    arrays, train_metrics = strategy.aggregate_train(1, train_replies, sent=sent_arrays(sent), arrays=global_arrays())
    eval_replies = [
        Message(
            RecordDict({METRICS: MetricRecord({"zero-shot-acc": ORDER_SENSITIVE.get(pid, 0.0), "num-examples": 5})}),
            reply_to=Message(RecordDict(), dst_node_id=NODE_IDS[pid], message_type=MessageType.EVALUATE),
        )
        for pid in order
    ]
    evaluated = {c.node_id for c in strategy.clients.values()}
    return arrays, train_metrics, strategy.aggregate_evaluate(1, eval_replies, evaluated=evaluated)


@pytest.mark.parametrize("order", [[2, 0, 1, 3, 4, 5, 6, 7, 8, 9], [9, 8, 7, 6, 5, 4, 3, 1, 0, 2]])
def test_aggregates_are_bit_identical_whatever_the_reply_order(fake_grid_class, order):
    # Under Ray replies arrive in varying order; sums must not follow it.
    arrays, train_metrics, eval_metrics = _aggregate_in_order(fake_grid_class, list(range(10)))
    other_arrays, other_train, other_eval = _aggregate_in_order(fake_grid_class, order)
    assert sorted(arrays) == sorted(other_arrays)
    for key in arrays:
        assert np.array_equal(arrays[key].numpy(), other_arrays[key].numpy()), key
    for key in ("train-loss", "anchor-routing-acc"):
        assert train_metrics[key] == other_train[key], key
    assert dict(eval_metrics) == dict(other_eval)


def test_evaluation_rounds_every_n_the_last_ones_and_the_final_round():
    from ddome_strategy.strategy import evaluates

    assert [r for r in range(1, 41) if evaluates(r, 40, 5)] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert [r for r in range(1, 41) if evaluates(r, 40, 5, last=4)] == [5, 10, 15, 20, 25, 30, 35, 37, 38, 39, 40]
    assert [r for r in range(1, 8) if evaluates(r, 7, 5)] == [5, 7]


def test_adaptive_dispatch_sends_each_client_the_experts_its_mass_needs_and_counts_their_bytes(fake_grid_class):
    from ddome_strategy.arrays import select

    # Normal clients 4..7: one concentrated on expert 1, one spread over three experts.
    scores_of = {
        4: [0.05, 0.9, 0.03, 0.02],
        5: [0.3, 0.3, 0.3, 0.1],
        6: [0.5, 0.45, 0.03, 0.02],
        7: [0.97, 0.01, 0.01, 0.01],
    }
    grid, clients = make_federation(fake_grid_class, range(100, 110), scores_of)
    strategy = make_strategy(top_k=3, min_top_k=1, dispatch_mass=0.8, anchors_per_round=0, normal_per_round=4)
    strategy.num_rounds = 1
    result = strategy.run_round(grid, 1, global_arrays())
    messages = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    sent = {clients[m.metadata.dst_node_id].partition_id: m for m in messages}
    assert {pid: experts_in(m.content[ARRAYS]) for pid, m in sent.items()} == {
        4: [1],
        5: [0, 1, 2],
        6: [0, 1],
        7: [0],
    }
    down = sum(r.count_bytes() for m in messages for r in m.content.array_records.values())
    gate = select(global_arrays(), ["gate."])
    routing = 4 * gate.count_bytes() + ArrayRecord({"w": Array(np.ones(1, np.float32))}).count_bytes() * 4
    assert result.train_metrics["bytes-down"] == down + routing


def test_the_generalist_goes_to_every_client_beside_the_top_k_of_the_anchor_owned_experts(fake_grid_class):
    # Expert M is the generalist: the gate scores M + 1 experts; top-K is picked among 0..M-1.
    arrays = ArrayRecord({**global_arrays(), f"expert.{M}.w": Array(np.full(2, 9.0, np.float32))})
    favours_generalist = [0.1, 0.3, 0.05, 0.05, 0.5]
    grid, clients = make_federation(fake_grid_class, range(100, 110), {p: favours_generalist for p in range(4, 10)})
    for client in clients.values():
        client.scores = np.asarray(favours_generalist)
    strategy = make_strategy(generalist=True, anchors_per_round=2, normal_per_round=3)
    assert (strategy.generalist, strategy.total_experts) == (M, M + 1)
    strategy.num_rounds = 1
    result = strategy.run_round(grid, 1, arrays)
    messages = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    for m in messages:
        cfg = m.content[CONFIG]
        assert cfg["generalist-expert"] == M
        if cfg["role"] == "anchor":
            assert experts_in(m.content[ARRAYS]) == sorted([clients[m.metadata.dst_node_id].partition_id, M])
        else:
            assert list(cfg["experts"]) == [1, 0, M]  # the best two of 0..M-1, then the generalist
            assert experts_in(m.content[ARRAYS]) == [0, 1, M]
    # Every trainer sent the generalist back: it is their weighted mean (100 + partition id).
    trainers = [clients[m.metadata.dst_node_id].partition_id for m in messages]
    weights = np.array([10.0 * (p + 1) for p in trainers])
    expected = float(np.dot(weights, [100.0 + p for p in trainers]) / weights.sum())
    assert np.allclose(result.arrays[f"expert.{M}.w"].numpy(), expected)
    assert result.train_metrics["expert-picks"][M] == 0  # picks count routing decisions only


def test_a_generalist_run_refuses_arrays_without_the_generalist(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, range(100, 110))
    with pytest.raises(ValueError, match="experts"):
        make_strategy(generalist=True).start(grid, global_arrays(), num_rounds=1)


# ---------------------------------------------------------------- what the strategy refuses


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("top_k", 0),
        ("top_k", M + 1),
        ("min_top_k", 0),
        ("min_top_k", M + 1),
        ("dispatch_mass", -0.1),
        ("dispatch_mass", 1.5),
        ("dispatch_mass", float("nan")),
        ("anchors_per_round", -1),
        ("normal_per_round", -2),
        ("normal_per_round", 2.5),
        ("eval_every", 0),
        ("eval_last", -1),
        ("min_train_replies", -1),
        ("min_nodes", -1),
        ("timeout", 0.0),
        ("timeout", float("nan")),
    ],
)
def test_impossible_settings_are_refused_at_construction(option, value):
    with pytest.raises(ValueError, match=rf"^{option} must be"):
        make_strategy(**{option: value})


def test_no_experts_or_no_client_per_round_is_refused():
    with pytest.raises(ValueError, match="^num_experts must be"):
        DDOME(0, layout_roles(0, 8))
    with pytest.raises(ValueError, match=r"^anchors_per_round \+ normal_per_round must be at least 1"):
        make_strategy(anchors_per_round=0, normal_per_round=0)


def _without(record, prefix):
    return ArrayRecord({k: v for k, v in record.items() if not k.startswith(prefix)})


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        (_without(global_arrays(), "expert.3."), r"holds experts \[0, 1, 2\], not experts 0..3"),
        (_without(global_arrays(), "gate."), "has no gate"),
        (
            ArrayRecord({**global_arrays(), "expert.4.w": Array(np.ones(2, np.float32))}),
            r"holds experts \[0, 1, 2, 3, 4\]",
        ),
        (
            ArrayRecord({**global_arrays(), "head.w": Array(np.ones(2, np.float32))}),
            "has a key 'head.w' that is neither",
        ),
    ],
)
def test_initial_arrays_that_are_not_a_gate_and_num_experts_experts_are_refused(fake_grid_class, arrays, reason):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    with pytest.raises(ValueError, match=f"^initial_arrays {reason}"):
        make_strategy().start(grid, arrays, num_rounds=1)
    assert grid.sent == []  # refused before any message


def test_start_refuses_an_impossible_timeout_or_first_round(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    with pytest.raises(ValueError, match="^timeout must be"):
        make_strategy().start(grid, global_arrays(), 1, -5.0)
    with pytest.raises(ValueError, match="^first_round must be"):
        make_strategy().start(grid, global_arrays(), 1, first_round=0)


def test_a_node_whose_role_of_raises_is_left_out_with_a_logged_reason(fake_grid_class, warnings_log):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    layout = layout_roles(M, 8)

    def role_of(partition_id):
        if partition_id == 5:
            raise KeyError("no role for partition 5")
        return layout(partition_id)

    strategy = DDOME(M, role_of, top_k=K, anchors_per_round=2, normal_per_round=3)
    result = strategy.start(grid, global_arrays(), num_rounds=1)
    assert NODE_IDS[5] not in strategy.clients and len(strategy.clients) == 9
    assert result.train_metrics_clientapp[1]["num-replies"] == 5
    (line,) = [m for m in warnings_log() if "role_of" in m]
    assert f"node {NODE_IDS[5]} " in line and "KeyError('no role for partition 5')" in line and "left out" in line


def test_warnings_about_a_node_name_its_role_and_partition_id(fake_grid_class, warnings_log):
    grid, _ = make_federation(fake_grid_class, NODE_IDS, failing={4, 5, 6, 7})  # normal clients send NaNs
    silent = NODE_IDS[2]
    grid.handlers[silent] = lambda m: None if m.metadata.message_type == MessageType.TRAIN else ScriptedClient(2)(m)
    real_send = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: [r for r in real_send(messages, timeout=timeout) if r]
    make_strategy(anchors_per_round=M, normal_per_round=4).start(grid, global_arrays(), num_rounds=1)
    log = "\n".join(warnings_log())
    assert f"train: no reply from nodes [{silent}] (dropped out or timed out); they are left out" in log
    assert f"[{silent}: anchor of expert 2, partition-id 2]" in log
    assert f"node {NODE_IDS[6]} [normal, partition-id 6]: train reply breaks protocol rule 'arrays record" in log
    assert "[normal, partition-id 6]" in log


def test_start_takes_flowers_positional_arguments_and_restores_the_poll_interval(fake_grid_class):
    # Flower's Strategy.start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn).
    flower = list(inspect.signature(Strategy.start).parameters)[1:]
    assert list(inspect.signature(DDOME.start).parameters)[1 : len(flower) + 1] == flower
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    grid.pull_interval = 0.1  # as Flower's simulation grid
    seen, evaluated = [], []
    real_send = grid.send_and_receive
    grid.send_and_receive = lambda messages, timeout=None: seen.append(grid.pull_interval) or real_send(messages)
    strategy = make_strategy()
    config = ConfigRecord({"lr-scale": 0.5})
    result = strategy.start(grid, global_arrays(), 2, 30.0, config, None, lambda r, a: evaluated.append(r))
    assert len(result.train_metrics_clientapp) == 2 and evaluated == [0, 1, 2] and strategy.timeout == 30.0
    train = [m for m in grid.sent if m.metadata.message_type == MessageType.TRAIN]
    assert all(m.content[CONFIG]["lr-scale"] == 0.5 for m in train)
    assert set(seen) == {0.01}  # polled often while the rounds ran
    assert grid.pull_interval == 0.1  # and the caller's grid is as it was


def test_the_poll_interval_is_restored_when_a_round_raises(fake_grid_class):
    grid, _ = make_federation(fake_grid_class, NODE_IDS)
    grid.pull_interval = 0.1

    def broken(messages, timeout=None):
        raise RuntimeError("link down")

    grid.send_and_receive = broken
    with pytest.raises(RuntimeError, match="link down"):
        make_strategy().start(grid, global_arrays(), num_rounds=1)
    assert grid.pull_interval == 0.1
