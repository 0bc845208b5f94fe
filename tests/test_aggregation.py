"""Per-expert federated averaging and the validation of client updates."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from ddome_strategy.aggregation import aggregate_moe, check_update


def record(**arrays):
    return ArrayRecord({k.replace("__", "."): Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def test_expert_averaged_over_its_trainers_gate_over_all_untrained_unchanged():
    current = record(gate__w=[0.0], expert__0__w=[0.0], expert__1__w=[5.0], expert__2__w=[7.0])
    updates = [
        (record(gate__w=[1.0], expert__0__w=[2.0]), 1.0),
        (record(gate__w=[4.0], expert__0__w=[8.0], expert__1__w=[3.0]), 3.0),
    ]
    merged = aggregate_moe(current, updates)
    assert merged["gate.w"].numpy() == pytest.approx([(1 * 1 + 4 * 3) / 4])
    assert merged["expert.0.w"].numpy() == pytest.approx([(2 * 1 + 8 * 3) / 4])
    assert merged["expert.1.w"].numpy() == pytest.approx([3.0])  # only one trainer
    assert merged["expert.2.w"].numpy() == pytest.approx([7.0])  # nobody trained it
    assert list(merged) == list(current)


def test_integer_buffers_stay_integer():
    current = ArrayRecord({"gate.n": Array(np.array(0, dtype=np.int64))})
    updates = [(ArrayRecord({"gate.n": Array(np.array(3, dtype=np.int64))}), 1.0)] * 2
    assert aggregate_moe(current, updates)["gate.n"].numpy().dtype == np.int64


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=6),
    weights=st.lists(st.integers(1, 1000), min_size=6, max_size=6),
)
def test_average_lies_within_the_updates_and_matches_numpy(values, weights):
    weights = weights[: len(values)]
    current = record(expert__0__w=[0.0])
    updates = [(record(expert__0__w=[v]), float(w)) for v, w in zip(values, weights)]
    got = float(aggregate_moe(current, updates)["expert.0.w"].numpy()[0])
    assert min(values) - 1e-3 <= got <= max(values) + 1e-3
    assert got == pytest.approx(np.average(values, weights=weights), rel=1e-5, abs=1e-3)


SENT = record(gate__w=[0.0, 0.0], expert__1__w=[0.0])


@pytest.mark.parametrize(
    ("update", "n", "reason"),
    [
        (record(gate__w=[1.0, 1.0]), 10, "missing"),
        (record(gate__w=[1.0, 1.0], expert__1__w=[1.0], expert__2__w=[1.0]), 10, "not sent"),
        (record(gate__w=[1.0], expert__1__w=[1.0]), 10, "shape"),
        (record(gate__w=[np.nan, 1.0], expert__1__w=[1.0]), 10, "NaN"),
        (record(gate__w=[np.inf, 1.0], expert__1__w=[1.0]), 10, "NaN or Inf"),
        (record(gate__w=[1.0, 1.0], expert__1__w=[1.0]), -3, "out of range"),
        (record(gate__w=[1.0, 1.0], expert__1__w=[1.0]), 10**12, "out of range"),
        (record(gate__w=[1.0, 1.0], expert__1__w=[1.0]), "many", "not a number"),
    ],
)
def test_bad_updates_are_rejected_with_a_reason(update, n, reason):
    assert reason in check_update(update, SENT, n)


def test_wrong_dtype_is_rejected_and_good_update_accepted():
    wrong = ArrayRecord({"gate.w": Array(np.zeros(2, np.float64)), "expert.1.w": Array(np.zeros(1, np.float32))})
    assert "expected" in check_update(wrong, SENT, 5)
    assert check_update(record(gate__w=[1.0, 2.0], expert__1__w=[3.0]), SENT, 5) == ""
