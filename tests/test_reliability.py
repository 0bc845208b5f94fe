"""Reliability: client faults, bad configuration, checkpoint and resume, untrusted input."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from client_app.app import app as client_app
from ddome_strategy.aggregation import aggregate_moe, check_update
from ddome_strategy.strategy import ARRAYS, CONFIG, METRICS, ROLE_QUERY, ROUTE_QUERY, sent_arrays
from server_app.app import build_common_expert, build_moe, build_strategy, run_ddome
from server_app.checkpoint import checkpoint_path, load_checkpoint, save_checkpoint
from server_app.config import ConfigError, resolve
from server_app.inprocess import InProcessGrid

ROOT = Path(__file__).resolve().parent.parent
NODES = 13


class FaultyGrid(InProcessGrid):
    """Some nodes reply with an error, some never reply (dropped or timed out)."""

    def __init__(self, erring: set, silent: set) -> None:
        super().__init__(client_app, NODES)
        self.erring, self.silent = erring, silent

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
            if pid in self.silent and message.metadata.message_type != ROLE_QUERY:
                continue
            if pid in self.erring and message.metadata.message_type == MessageType.TRAIN:
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


class RaisingClientApp:
    """Wraps a ClientApp; raises for some partition ids in some phases (message types)."""

    def __init__(self, app, fail: dict) -> None:
        self.app, self.fail = app, fail

    def __call__(self, message, context):
        pid = context.node_config["partition-id"]
        if message.metadata.message_type in self.fail.get(pid, ()):
            raise RuntimeError(f"partition {pid} crashed")
        return self.app(message, context)


class FlowerLikeGrid(InProcessGrid):
    """Like Flower's runtime: an exception in a ClientApp becomes an error reply, and only
    the replies that arrive within ``timeout`` come back (node delays are simulated)."""

    def __init__(self, app, delays=None) -> None:
        super().__init__(app, NODES)
        self.delays = delays or {}
        self.timeouts, self.trained = [], []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            pid = context.node_config["partition-id"]
            if message.metadata.message_type == MessageType.TRAIN:
                self.trained.append(pid)
            if message.metadata.message_type != ROLE_QUERY and self.delays.get(pid, 0) > timeout:
                continue
            try:
                replies.append(self.client_app(message, context))
            except Exception as err:  # what Flower's ClientApp runtime does
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=message))
        return replies


def metrics(summary):
    run_dir = Path(summary["output"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_training_goes_on_when_clients_fail_and_accuracy_still_rises(tiny_run_config, tmp_path):
    # Partition 1 is an anchor whose training always errors; 7 and 11 never answer.
    grid = FaultyGrid(erring={1, 6}, silent={7, 11})
    summary = run_ddome(grid, tiny_run_config(tmp_path, **{"experts-init": "random", "eval-every": 2}))
    rows = metrics(summary)
    trained = [r for r in rows if r["stage"] == "train"]
    evaluated = [r for r in rows if r["stage"] == "evaluate"]
    assert [r["round"] for r in trained] == list(range(1, 11))
    assert all(r["num-replies"] < 10 for r in trained)  # failed clients were left out
    # The experts' own prediction (the mixture) learns; the default rule's blend with the
    # common expert is high from the first evaluation on.
    assert evaluated[-1]["test/mixture-acc"] > evaluated[0]["test/mixture-acc"] + 0.1
    assert evaluated[-1]["test/num-clients"] == 2  # test client 11 never answered


def test_clients_failing_or_timing_out_in_routing_are_simply_not_trained(tiny_run_config, tmp_path, warnings_log):
    # Normal partitions 5 and 6 raise in the routing query; 7 answers too late every time.
    grid = FlowerLikeGrid(RaisingClientApp(client_app, {5: {ROUTE_QUERY}, 6: {ROUTE_QUERY}}), delays={7: 1e6})
    summary = run_ddome(grid, tiny_run_config(tmp_path, **{"num-server-rounds": 3, "round-timeout": 30.0}))
    trained = [r for r in metrics(summary) if r["stage"] == "train"]
    assert [r["round"] for r in trained] == [1, 2, 3]
    assert all(r["num-replies"] == 5 + 2 for r in trained)  # all 5 anchors + normal clients 8 and 9
    assert not {5, 6, 7} & set(grid.trained)
    assert set(grid.timeouts) == {30.0}  # round-timeout reaches the grid
    log = "\n".join(warnings_log())
    assert "node 1005 replied with an error" in log and "node 1006 replied with an error" in log
    assert "routing: no reply from nodes [1007]" in log
    assert summary["zero-shot-acc"] is not None


def test_clients_crashing_in_training_are_left_out(tiny_run_config, tmp_path, warnings_log):
    # A ClientApp that raises (Flower turns it into an error reply) for anchor 2 and normal 9.
    grid = FlowerLikeGrid(RaisingClientApp(client_app, {2: {MessageType.TRAIN}, 9: {MessageType.TRAIN}}))
    summary = run_ddome(grid, tiny_run_config(tmp_path, **{"num-server-rounds": 2}))
    assert [r["num-replies"] for r in metrics(summary) if r["stage"] == "train"] == [8, 8]
    assert "train: node 1002 replied with an error" in "\n".join(warnings_log())


def test_an_expert_whose_trainers_all_fail_keeps_its_weights(tiny_run_config, tmp_path):
    # Anchor 1 always fails; with no normal clients nobody else trains expert 1.
    grid = FaultyGrid(erring={1}, silent=set())
    summary = run_ddome(grid, tiny_run_config(tmp_path, **{"normal-per-round": 0, "num-server-rounds": 2}))
    run_dir = Path(summary["output"])
    initial = torch.load(run_dir / "checkpoints" / "common_expert.pt", weights_only=True)
    final = torch.load(run_dir / "checkpoints" / "moe.pt", weights_only=True)
    for key, value in initial.items():
        assert torch.equal(final[f"expert.1.{key}"], value)  # untouched: still the common expert
        assert not torch.equal(final[f"expert.0.{key}"], value)


def test_round_is_skipped_when_too_few_replies_arrive(tiny_run_config, tmp_path, monkeypatch, warnings_log):
    saved = []
    real_save = save_checkpoint
    monkeypatch.setattr("server_app.app.save_checkpoint", lambda *a: saved.append(a[1]) or real_save(*a))
    grid = FaultyGrid(erring=set(range(10)), silent=set())
    config = tiny_run_config(tmp_path, **{"num-server-rounds": 2, "min-train-replies": 3})
    summary = run_ddome(grid, config)
    assert all(r["num-replies"] == 0 for r in metrics(summary) if r["stage"] == "train")
    assert sum("round" in m and "skipped" in m for m in warnings_log()) == 2
    assert saved == [0, 1, 2]  # a checkpoint after every round, skipped or not
    # Nothing was aggregated: the final arrays are the initial ones, bit for bit.
    cfg = resolve(config)
    dataset, common, _ = build_common_expert(cfg)
    initial = build_moe(cfg, dataset, common).to_torch_state_dict()
    final = torch.load(Path(summary["output"]) / "checkpoints" / "moe.pt", weights_only=True)
    assert final.keys() == initial.keys() and all(torch.equal(final[k], initial[k]) for k in final)


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
def test_bad_configuration_stops_before_training(tiny_run_config, tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, **overrides))
    assert not (tmp_path / "out").exists()  # nothing written either


def test_interrupted_run_resumes_to_the_same_result(tiny_run_config, tmp_path):
    config = tiny_run_config(tmp_path, **{"num-server-rounds": 6, "eval-every": 3})
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


def test_checkpoint_write_is_atomic(tiny_run_config, tmp_path, monkeypatch):
    config = tiny_run_config(tmp_path, **{"num-server-rounds": 2})
    summary = run_ddome(InProcessGrid(client_app, NODES), config)
    path = checkpoint_path(Path(summary["output"]))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("torch.save", crash)
    with pytest.raises(OSError):
        save_checkpoint(path.parent.parent, 3, load_checkpoint(path)[1], {})
    assert path.read_bytes() == before and load_checkpoint(path)[0] == 2
    assert not list(path.parent.glob("*.tmp"))


def _calls(text: str, name: str) -> list[str]:
    """The full text of every ``name(...)`` call in ``text`` (nested parentheses included)."""
    calls = []
    for match in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, match.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        calls.append(text[match.start() : i])
    return calls


def test_nothing_is_unpickled_unsafely():
    # The app's code (not the tests, which build fake pickled dataset files).
    sources = [
        p
        for d in ("ddome_strategy", "client_app", "server_app", "data", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
    ]
    assert len(sources) > 10
    unsafe = re.compile(r"^\s*(import|from)\s+(pickle|cPickle|_pickle|dill|cloudpickle|joblib|shelve|marshal)\b", re.M)
    for source in sources:
        text = source.read_text()
        assert not unsafe.search(text), source
        assert "pickle.load" not in text and "allow_pickle=True" not in text, source
        for call in _calls(text, "torch.load"):
            assert "weights_only=True" in call, f"{source}: {call}"
    assert _calls("x = torch.load(Path(p), map_location='cpu')", "torch.load") == [
        "torch.load(Path(p), map_location='cpu')"
    ]


# ---------------------------------------------------------------- bad replies


@pytest.fixture(scope="module")
def federation(tiny_run_config, tmp_path_factory):
    """The tiny run's configuration, common expert and initial arrays."""
    cfg = resolve(tiny_run_config(tmp_path_factory.mktemp("federation")))
    dataset, common, _ = build_common_expert(cfg)
    return cfg, common, build_moe(cfg, dataset, common)


@pytest.fixture(scope="module")
def one_round(federation):
    """A strategy after the dispatch phase of round 1, the messages and the real replies."""
    cfg, common, initial = federation
    grid = InProcessGrid(client_app, NODES)
    strategy = build_strategy(cfg, common)
    strategy.num_rounds = 1
    strategy.discover(grid)
    anchors, normals = strategy.sample(grid)
    routing = strategy.route(grid, normals, 1, initial)
    messages = strategy.configure_train(1, initial, ConfigRecord(), anchors=anchors, routing=routing)
    replies = list(grid.send_and_receive(messages))
    return strategy, initial, messages, replies


def aggregate(strategy, initial, messages, replies):
    return strategy.aggregate_train(1, replies, sent=sent_arrays(messages), arrays=initial)


def assert_bitwise_equal(a: ArrayRecord, b: ArrayRecord) -> None:
    assert list(a) == list(b)
    for key in a:
        x, y = a[key].numpy(), b[key].numpy()
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key


def corrupted(kind: str, reply: Message, message: Message, initial: ArrayRecord) -> Message:
    arrays = {k: v.numpy().copy() for k, v in reply.content[ARRAYS].items()}
    numbers = dict(reply.content[METRICS])
    key = next(k for k in arrays if k.startswith("expert."))
    mine = {k.split(".")[1] for k in arrays if k.startswith("expert.")}
    other = next(str(e) for e in range(5) if str(e) not in mine)
    changes = {
        "missing key": lambda: arrays.pop(key),
        "extra key": lambda: arrays.update({"expert.9.w": np.zeros(3, np.float32)}),
        "expert it was not sent": lambda: arrays.update(
            {k: initial[k].numpy() + 1 for k in initial if k.startswith(f"expert.{other}.")}
        ),
        "wrong shape": lambda: arrays.update({key: arrays[key].reshape(-1)[:-1]}),
        "transposed": lambda: arrays.update({key: arrays[key].reshape(-1, 1)}),
        "wrong dtype": lambda: arrays.update({key: arrays[key].astype(np.float64)}),
        "half precision": lambda: arrays.update({key: arrays[key].astype(np.float16)}),
        "NaN": lambda: arrays[key].flat.__setitem__(0, np.nan),
        "Inf": lambda: arrays[key].flat.__setitem__(-1, -np.inf),
        "negative count": lambda: numbers.update({"num-examples": -120}),
        "zero count": lambda: numbers.update({"num-examples": 0}),
        "absurd count": lambda: numbers.update({"num-examples": 10**15}),
        "NaN count": lambda: numbers.update({"num-examples": float("nan")}),
        "list count": lambda: numbers.update({"num-examples": [1, 2]}),
        "no count": lambda: numbers.pop("num-examples"),
    }
    if kind == "no arrays":
        return Message(RecordDict({METRICS: MetricRecord(numbers)}), reply_to=message)
    if kind == "metrics not a MetricRecord":
        content = {ARRAYS: reply.content[ARRAYS], METRICS: ConfigRecord({"num-examples": "120"})}
        return Message(RecordDict(content), reply_to=message)
    changes[kind]()
    content = {ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}), METRICS: MetricRecord(numbers)}
    return Message(RecordDict(content), reply_to=message)


BAD_UPDATES = [
    "missing key",
    "extra key",
    "expert it was not sent",
    "wrong shape",
    "transposed",
    "wrong dtype",
    "half precision",
    "NaN",
    "Inf",
    "negative count",
    "zero count",
    "absurd count",
    "NaN count",
    "list count",
    "no count",
    "no arrays",
    "metrics not a MetricRecord",
]


@pytest.mark.parametrize("kind", BAD_UPDATES)
@pytest.mark.parametrize("role", ["normal", "anchor"])
def test_a_bad_update_is_rejected_logged_and_never_reaches_the_aggregate(one_round, warnings_log, kind, role):
    strategy, initial, messages, replies = one_round
    index = next(i for i, m in enumerate(messages) if m.content[CONFIG]["role"] == role)
    victim = messages[index].metadata.dst_node_id
    others = [r for r in replies if r.metadata.src_node_id != victim]
    expected, _ = aggregate(strategy, initial, messages, others)
    bad = corrupted(kind, replies[index], messages[index], initial)
    got, round_metrics = aggregate(strategy, initial, messages, [*others[:3], bad, *others[3:]])
    assert_bitwise_equal(got, expected)
    assert round_metrics["num-replies"] == len(others)
    assert any(f"node {victim}" in m and "rejected" in m for m in warnings_log())


def test_duplicate_and_unsolicited_updates_are_rejected(one_round, warnings_log):
    strategy, initial, messages, replies = one_round
    expected, _ = aggregate(strategy, initial, messages, replies)
    duplicate = Message(replies[0].content, reply_to=messages[0])
    never_asked = Message(RecordDict(), dst_node_id=1012, message_type=MessageType.TRAIN)  # a test client
    unsolicited = Message(replies[0].content, reply_to=never_asked)
    got, round_metrics = aggregate(strategy, initial, messages, [*replies, duplicate, unsolicited])
    assert_bitwise_equal(got, expected)
    assert round_metrics["num-replies"] == len(replies)
    log = "\n".join(warnings_log())
    assert f"node {messages[0].metadata.dst_node_id} sent an update it was not asked for" in log
    assert "node 1012 sent an update it was not asked for" in log


class ReplacingGrid(InProcessGrid):
    """Replaces the reply of ``node`` to a message of type ``message_type`` by ``content``."""

    def __init__(self, node: int, message_type: str, content: RecordDict) -> None:
        super().__init__(client_app, NODES)
        self.node, self.message_type, self.content = node, message_type, content

    def send_and_receive(self, messages, *, timeout=None):
        return [
            Message(self.content, reply_to=m)
            if m.metadata.dst_node_id == self.node and m.metadata.message_type == self.message_type
            else self.client_app(m, self.contexts[m.metadata.dst_node_id])
            for m in messages
        ]


def scores(values) -> RecordDict:
    return RecordDict({METRICS: MetricRecord({"gate-scores": values})})


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "content",
    [
        RecordDict(),
        RecordDict({METRICS: MetricRecord({"scores": [0.2] * 5})}),
        RecordDict({METRICS: ConfigRecord({"gate-scores": ["0.2"] * 5})}),
        RecordDict({CONFIG: ConfigRecord({"gate-scores": [0.2] * 5})}),
        scores(1.0),
        scores([0.5, 0.5]),
        scores([0.1] * 10),
        scores([NAN] * 5),
        scores([INF, 0.0, 0.0, 0.0, 0.0]),
        scores([1.5, -0.5, 0.0, 0.0, 0.0]),
        scores([0.9] * 5),
        scores([0.0] * 5),
    ],
    ids=lambda c: repr(c)[:60],
)
def test_malformed_gate_scores_leave_the_client_out(federation, warnings_log, content):
    cfg, common, initial = federation
    grid = ReplacingGrid(1005, ROUTE_QUERY, content)
    strategy = build_strategy(cfg, common)
    strategy.discover(grid)
    normals = strategy._with_role(grid, "normal")
    chosen = strategy.route(grid, normals, 1, initial).experts
    assert set(chosen) == {c.node_id for c in normals} - {1005}
    assert all(len(experts) == 2 for experts in chosen.values())
    assert any(
        m.startswith("node 1005 [normal, partition-id 5]: routing reply breaks protocol rule") for m in warnings_log()
    )


@pytest.mark.parametrize("pid", ["3", -4, True, 2.5, [1, 2], b"3", None])
def test_a_role_reply_with_a_bad_partition_id_leaves_the_node_out(federation, warnings_log, pid):
    cfg, common, _ = federation
    content = RecordDict({CONFIG: ConfigRecord({} if pid is None else {"partition-id": pid})})
    grid = ReplacingGrid(1003, ROLE_QUERY, content)
    strategy = build_strategy(cfg, common)
    strategy.discover(grid)
    assert 1003 not in strategy.clients and len(strategy.clients) == NODES - 1
    assert any(m.startswith("node 1003: role query reply breaks protocol rule") for m in warnings_log())


# ---------------------------------------------------------------- aggregation properties

LAYOUT = {
    "gate.w": ((3, 2), np.float32),
    "gate.b": ((2,), np.float32),
    "expert.0.w": ((2, 2), np.float32),
    "expert.0.b": ((2,), np.float32),
    "expert.1.w": ((4,), np.float32),
    "expert.2.w": ((1, 3), np.float32),
    "expert.3.w": ((2,), np.float32),
    "expert.3.n": ((), np.int64),
}
EXPERTS = range(4)


def _values(draw, shape, dtype):
    size = int(np.prod(shape))
    if dtype == np.int64:
        items = draw(st.lists(st.integers(-1000, 1000), min_size=size, max_size=size))
    else:
        element = st.floats(-1e3, 1e3, width=32, allow_subnormal=False)
        items = draw(st.lists(element, min_size=size, max_size=size))
    return np.asarray(items, dtype=dtype).reshape(shape)


@st.composite
def moe_round(draw):
    """Global arrays and 1-5 updates, each of the gate and a random subset of experts."""
    current = ArrayRecord({k: Array(_values(draw, s, d)) for k, (s, d) in LAYOUT.items()})
    updates = []
    for _ in range(draw(st.integers(1, 5))):
        experts = draw(st.sets(st.sampled_from(EXPERTS), max_size=3))
        keys = [k for k in LAYOUT if k.startswith("gate.") or int(k.split(".")[1]) in experts]
        record = ArrayRecord({k: Array(_values(draw, *LAYOUT[k])) for k in keys})
        updates.append((record, float(draw(st.integers(1, 10**6)))))
    return current, updates


def _close(a: ArrayRecord, b: ArrayRecord) -> bool:
    return all(np.allclose(a[k].numpy(), b[k].numpy(), rtol=1e-6, atol=1e-3) for k in a)


@settings(max_examples=60, deadline=None)
@given(data=moe_round(), order=st.randoms(use_true_random=False), scale=st.integers(2, 1000))
def test_aggregation_properties(data, order, scale):
    current, updates = data
    merged = aggregate_moe(current, updates)
    # Same keys, shapes and dtypes as the global arrays.
    assert [(k, a.shape, a.dtype) for k, a in merged.items()] == [(k, a.shape, a.dtype) for k, a in current.items()]
    for key, array in merged.items():
        carriers = [u[key].numpy() for u, _ in updates if key in u]
        value = array.numpy()
        if not carriers:  # an expert nobody trained: bit-identical
            assert value.tobytes() == current[key].numpy().tobytes()
            continue
        # A convex combination: element-wise within the updates' bounds (up to float32 rounding).
        low, high = np.min(carriers, axis=0), np.max(carriers, axis=0)
        slack = 1e-6 * np.maximum(1, np.abs(value))
        assert np.all(low - slack <= value) and np.all(value <= high + slack), key
    # Independent of the order of the replies and of the weights' scale.
    shuffled = list(updates)
    order.shuffle(shuffled)
    assert _close(aggregate_moe(current, shuffled), merged)
    assert _close(aggregate_moe(current, [(u, w * scale) for u, w in updates]), merged)


def _corrupt(draw, update: ArrayRecord, weight: float):
    """A copy of ``update`` (and weight) with one defect ``check_update`` must catch."""
    arrays = {k: v.numpy().copy() for k, v in update.items()}
    floats = [k for k in arrays if arrays[k].dtype == np.float32]
    kind = draw(
        st.sampled_from(
            ["drop", "add", "reshape", "dtype", "nan", "inf", "weight", "unsent"]
            if set(update) != set(LAYOUT)
            else ["drop", "add", "reshape", "dtype", "nan", "inf", "weight"]
        )
    )
    key = draw(st.sampled_from(sorted(arrays)))
    if kind == "drop":
        del arrays[key]
    elif kind == "add":
        arrays["expert.7.w"] = np.zeros(2, np.float32)
    elif kind == "unsent":
        missing = sorted(set(LAYOUT) - set(arrays))
        extra = draw(st.sampled_from(missing))
        arrays[extra] = np.zeros(*LAYOUT[extra])
    elif kind == "reshape":
        arrays[key] = np.append(arrays[key], arrays[key].reshape(-1)[:1])
    elif kind == "dtype":
        arrays[key] = arrays[key].astype(draw(st.sampled_from([np.float64, np.float16, np.int32, np.int8])))
    elif kind in ("nan", "inf"):
        key = draw(st.sampled_from(floats))
        index = draw(st.integers(0, arrays[key].size - 1))
        arrays[key].reshape(-1)[index] = np.nan if kind == "nan" else draw(st.sampled_from([np.inf, -np.inf]))
    else:
        weight = draw(st.sampled_from([0, -1, -1e9, 1e10, float("nan"), float("inf"), True, None, "10", [5]]))
    return ArrayRecord({k: Array(v) for k, v in arrays.items()}), weight


@settings(max_examples=80, deadline=None)
@given(data=moe_round(), pick=st.data())
def test_any_corrupted_update_is_rejected_and_the_others_aggregate_as_without_it(data, pick):
    current, updates = data
    sent = [ArrayRecord({k: current[k] for k in u}) for u, _ in updates]
    assert all(check_update(u, s, w) == "" for (u, w), s in zip(updates, sent))
    index = pick.draw(st.integers(0, len(updates) - 1))
    bad, bad_weight = _corrupt(pick.draw, *updates[index])
    assert check_update(bad, sent[index], bad_weight) != ""
    received = [*updates[:index], (bad, bad_weight), *updates[index + 1 :]]
    accepted = [(u, w) for (u, w), s in zip(received, sent) if not check_update(u, s, w)]
    without = [*updates[:index], *updates[index + 1 :]]
    assert_bitwise_equal(aggregate_moe(current, accepted), aggregate_moe(current, without))


# ---------------------------------------------------------------- configuration and checkpoints


def test_a_preset_with_a_typo_or_too_few_clients_stops_before_any_message(tiny_run_config, tmp_path):
    preset = tmp_path / "typo.yaml"
    preset.write_text("dataset: digits\nnum-expert: 4\n")
    with pytest.raises(ConfigError, match="'num-expert'"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, **{"config-file": str(preset)}))
    # More anchors (one per expert) than training clients.
    with pytest.raises(ConfigError, match="num-train-clients=10 must be at least num-experts=11"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, **{"num-experts": 11}))
    assert not (tmp_path / "out").exists()


def test_extending_a_finished_run_from_its_checkpoint_file_equals_a_longer_run(tiny_run_config, tmp_path):
    longer = run_ddome(InProcessGrid(client_app, NODES), tiny_run_config(tmp_path, **{"num-server-rounds": 3}))
    shorter = run_ddome(InProcessGrid(client_app, NODES), tiny_run_config(tmp_path, **{"num-server-rounds": 2}))
    file = checkpoint_path(Path(shorter["output"]))
    checkpoint = load_checkpoint(file)
    assert checkpoint.round == 2 and "rng" in checkpoint.strategy and checkpoint.torch_rng is not None
    config = tiny_run_config(tmp_path, **{"num-server-rounds": 3, "resume": str(file)})
    extended = run_ddome(InProcessGrid(client_app, NODES), config)
    assert extended["output"] == shorter["output"]
    a = torch.load(Path(longer["output"]) / "checkpoints" / "moe.pt", weights_only=True)
    b = torch.load(Path(extended["output"]) / "checkpoints" / "moe.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["round"] for r in metrics(extended) if r["stage"] == "train"] == [1, 2, 3]

    # A checkpoint that does not fit the configuration (expert 4 missing) is refused.
    elsewhere = tmp_path / "copied-run"
    arrays = ArrayRecord({k: v for k, v in checkpoint.arrays.items() if not k.startswith("expert.4.")})
    save_checkpoint(elsewhere, 2, arrays, checkpoint.strategy)
    with pytest.raises(ConfigError, match="resume: the checkpoint does not fit"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, **{"resume": str(elsewhere)}))


class Exploit:
    """Unpickling this runs ``open(path, "w")``: what a malicious checkpoint would do."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_corrupt_or_malicious_checkpoint_is_refused_before_any_message(tiny_run_config, tmp_path):
    run_dir = tmp_path / "run"
    path = checkpoint_path(run_dir)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(ConfigError, match="not a valid checkpoint"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, resume=str(run_dir)))
    marker = tmp_path / "code-ran"
    torch.save({"round": 1, "arrays": {}, "strategy": {"rng": Exploit(marker)}}, path)
    with pytest.raises(ConfigError, match="not a valid checkpoint"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, resume=str(path)))
    assert not marker.exists()
    torch.save({"round": "1", "arrays": [], "strategy": {}}, path)  # loadable, but not ours
    with pytest.raises(ConfigError, match="not a checkpoint written by this app"):
        run_ddome(NoMessagesGrid(), tiny_run_config(tmp_path, resume=str(path)))
    assert not (tmp_path / "out").exists()
