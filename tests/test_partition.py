"""The paper's partitions: disjoint anchors, unseen test combinations, determinism."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data import PARTITION_MODES, make_partition

CLASSES = 10
TRAIN = np.repeat(np.arange(CLASSES), 100)
TEST = np.repeat(np.arange(CLASSES), 30)


def plan(**kw):
    args = dict(
        num_classes=CLASSES,
        num_experts=5,
        num_train_clients=12,
        num_test_clients=3,
        labels_per_client=4,
        samples_per_client=60,
        eval_samples_per_client=20,
        seed=0,
    )
    args.update(kw)
    return make_partition(TRAIN, TEST, **args)


def anchor_groups(p):
    return [set(p.client_labels[i]) for i in range(p.num_experts)]


@pytest.mark.parametrize("mode", ["grouped", "free"])
def test_anchor_label_groups_are_disjoint(mode):
    groups = anchor_groups(plan(mode=mode))
    for a, b in itertools.combinations(groups, 2):
        assert not a & b
    assert all(len(g) == 2 for g in groups)


def test_grouped_clients_hold_unions_of_whole_anchor_groups():
    p = plan()
    groups = anchor_groups(p)
    for labels in p.client_labels[p.num_experts :]:
        covering = [g for g in groups if g <= set(labels)]
        assert set().union(*covering) == set(labels) and len(covering) == 2


@pytest.mark.parametrize("mode", PARTITION_MODES)
def test_test_clients_hold_label_sets_no_training_client_has(mode):
    p = plan(mode=mode)
    train_sets = {tuple(sorted(s)) for s in p.client_labels[: p.num_train_clients]}
    test_sets = p.client_labels[p.num_train_clients :]
    assert len(test_sets) == 3
    assert not train_sets & {tuple(sorted(s)) for s in test_sets}


@pytest.mark.parametrize("mode", PARTITION_MODES)
def test_clients_only_get_their_labels_and_never_the_public_split(mode):
    p = plan(mode=mode)
    public = set(p.public_indices.tolist())
    assert len(public) == 100  # 10% of each label, stratified
    for pid in range(p.num_train_clients):
        idx = p.train_indices[pid]
        assert len(idx) == len(set(idx.tolist()))  # never twice to one client
        assert set(TRAIN[idx].tolist()) <= set(p.client_labels[pid])
        assert not public & set(idx.tolist())
    for pid in range(p.num_partitions):
        assert set(TEST[p.eval_indices[pid]].tolist()) <= set(p.client_labels[pid])


def test_test_clients_hold_all_test_images_of_their_labels():
    p = plan()
    for pid in range(p.num_train_clients, p.num_partitions):
        assert len(p.eval_indices[pid]) == 30 * len(p.client_labels[pid])


def test_roles_follow_the_partition_layout():
    p = plan()
    assert [p.role(i) for i in (0, 4, 5, 11, 12, 14)] == ["anchor", "anchor", "normal", "normal", "test", "test"]
    with pytest.raises(ValueError, match="partition-id"):
        p.role(15)


@pytest.mark.parametrize("mode", PARTITION_MODES)
def test_deterministic_for_a_seed_and_different_across_seeds(mode):
    a, b, c = plan(mode=mode), plan(mode=mode), plan(mode=mode, seed=1)
    assert a.client_labels == b.client_labels
    assert all(np.array_equal(x, y) for x, y in zip(a.train_indices, b.train_indices))
    assert any(not np.array_equal(x, y) for x, y in zip(a.train_indices, c.train_indices))


def test_dirichlet_with_small_alpha_is_skewed():
    p = plan(mode="dirichlet", dirichlet_alpha=0.1)
    top_share = [np.bincount(TRAIN[i], minlength=CLASSES).max() / len(i) for i in p.train_indices]
    assert np.mean(top_share) > 0.5  # a uniform mix would give ~0.1


def test_dirichlet_test_clients_are_unseen_unions_of_anchor_groups_where_they_fit():
    # Both modes draw the anchor groups from the same seed before anything else.
    groups = anchor_groups(plan(mode="grouped"))
    p = plan(mode="dirichlet")
    for labels in p.client_labels[p.num_train_clients :]:
        assert sum(g <= set(labels) for g in groups) == 2 and len(labels) == 4
    # Three labels are no union of 2-label groups: free sets of three labels instead.
    p = plan(mode="dirichlet", labels_per_client=3)
    assert all(len(labels) == 3 for labels in p.client_labels[p.num_train_clients :])


def test_free_mode_raises_when_no_unseen_label_set_is_left():
    # One 10-label set exists and the single normal client holds it.
    with pytest.raises(ValueError, match="num-test-clients"):
        plan(mode="free", labels_per_client=10, num_train_clients=6, num_test_clients=1)


@pytest.mark.parametrize(
    ("kw", "key"),
    [
        ({"num_experts": 11}, "num-experts"),
        ({"dirichlet_alpha": 0.0, "mode": "dirichlet"}, "dirichlet-alpha"),
        ({"eval_samples_per_client": -1}, "eval-samples-per-client"),
        ({"num_classes": 8}, "train_labels"),
        ({"num_train_clients": 4}, "num-train-clients"),
        ({"labels_per_client": 3}, "labels-per-client"),
        ({"labels_per_client": 2}, "labels-per-client"),
        ({"num_test_clients": 10}, "num-test-clients"),
        ({"mode": "iid"}, "partition-mode"),
    ],
)
def test_bad_arguments_name_the_key(kw, key):
    with pytest.raises(ValueError, match=key):
        plan(**kw)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), mode=st.sampled_from(PARTITION_MODES), seed=st.integers(0, 10_000))
def test_any_valid_plan_is_consistent(data, mode, seed):
    experts = data.draw(st.sampled_from([3, 5]), label="num_experts")
    group_size = CLASSES // experts
    groups_per_client = data.draw(st.integers(2, experts - 1), label="groups per client")
    test_clients = data.draw(st.integers(1, math.comb(experts, groups_per_client) - 1), label="num_test_clients")
    train_clients = experts + data.draw(st.integers(0, 8), label="normal clients")
    p = plan(
        num_experts=experts,
        num_train_clients=train_clients,
        num_test_clients=test_clients,
        labels_per_client=groups_per_client * group_size,
        mode=mode,
        seed=seed,
    )
    assert len(p.client_labels) == len(p.eval_indices) == p.num_partitions == train_clients + test_clients
    assert len(p.train_indices) == p.num_train_clients
    public = set(p.public_indices.tolist())
    for pid, idx in enumerate(p.train_indices):
        assert 0 < len(idx) == len(set(idx.tolist())) <= 60
        assert set(TRAIN[idx].tolist()) <= set(p.client_labels[pid]) and not public & set(idx.tolist())
    for pid, idx in enumerate(p.eval_indices):
        assert set(TEST[idx].tolist()) <= set(p.client_labels[pid])
    train_sets = {tuple(sorted(s)) for s in p.client_labels[: p.num_train_clients]}
    test_sets = [tuple(sorted(s)) for s in p.client_labels[p.num_train_clients :]]
    assert len(set(test_sets)) == test_clients and not train_sets & set(test_sets)


@pytest.mark.parametrize("mode", PARTITION_MODES)
def test_validation_split_is_held_out_and_replaces_the_test_split_for_tuning(mode):
    test_plan, validation_plan = plan(mode=mode), plan(mode=mode, evaluation_split="validation")
    # Training clients and label sets are the same in both modes: only the evaluation data moves.
    assert test_plan.client_labels == validation_plan.client_labels
    assert all(np.array_equal(a, b) for a, b in zip(test_plan.train_indices, validation_plan.train_indices))
    assert test_plan.eval_split == "test" and validation_plan.eval_split == "train"
    trained = set(np.concatenate(validation_plan.train_indices).tolist()) | set(validation_plan.public_indices.tolist())
    for pid, idx in enumerate(validation_plan.eval_indices):
        # Validation images come from the training split, never from a client's or the public data...
        assert not trained & set(idx.tolist())
        # ...and hold the client's labels; unseen clients get all validation images of theirs.
        assert set(TRAIN[idx].tolist()) <= set(validation_plan.client_labels[pid])
    for pid in range(validation_plan.num_train_clients, validation_plan.num_partitions):
        labels = validation_plan.client_labels[pid]
        assert len(validation_plan.eval_indices[pid]) == 10 * len(labels)  # 10% of 100 per label


def test_validation_needs_a_validation_fraction():
    with pytest.raises(ValueError, match="validation-fraction"):
        plan(evaluation_split="validation", validation_fraction=0.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_test_clients_are_no_subset_of_a_training_clients_labels(seed):
    # Dirichlet clients hold label sets of any size: one holding a superset of a test
    # client's labels has seen that combination, which exact-set equality let through.
    p = make_partition(
        np.repeat(np.arange(CLASSES), 600),
        np.repeat(np.arange(CLASSES), 100),
        num_classes=CLASSES,
        num_experts=5,
        num_train_clients=20,
        num_test_clients=5,
        labels_per_client=4,
        mode="dirichlet",
        dirichlet_alpha=0.1,
        samples_per_client=500,
        seed=seed,
    )
    train_sets = [set(labels) for labels in p.client_labels[: p.num_train_clients]]
    test_sets = p.client_labels[p.num_train_clients :]
    assert len(test_sets) == 5 and all(len(labels) == 4 for labels in test_sets)
    for labels in test_sets:
        assert not [held for held in train_sets if set(labels) <= held], labels


def test_dirichlet_raises_when_every_label_set_is_within_a_training_client():
    # A training client holding all ten labels has seen every combination.
    with pytest.raises(ValueError, match="num-test-clients"):
        plan(mode="dirichlet", dirichlet_alpha=1000.0, labels_per_client=3, num_train_clients=6, num_test_clients=1)


def test_dirichlet_group_anchors_hold_their_own_group_and_normal_clients_stay_dirichlet():
    literal = plan(mode="dirichlet", dirichlet_alpha=0.1)
    grouped = plan(mode="dirichlet", dirichlet_alpha=0.1, dirichlet_anchors="group")
    groups = anchor_groups(grouped)
    for i, group in enumerate(groups):
        labels = TRAIN[grouped.train_indices[i]]
        # The anchor's samples are its group's labels only, evenly dealt: it defines expert i.
        assert set(labels.tolist()) == group
        assert max(np.bincount(labels)[list(group)]) - min(np.bincount(labels)[list(group)]) <= 1
    assert sum(len(g) for g in groups) == len(set().union(*groups))  # still disjoint
    # Normal clients stay Dirichlet-skewed (a dominant label), and the literal reading is kept.
    top_shares = [
        np.bincount(TRAIN[grouped.train_indices[pid]], minlength=CLASSES).max() / len(grouped.train_indices[pid])
        for pid in range(grouped.num_experts, grouped.num_train_clients)
    ]
    assert np.mean(top_shares) > 0.5  # Dir(0.1) over 10 labels; 4 even labels would give 0.25
    assert any(len(literal.client_labels[i]) != 2 for i in range(literal.num_experts))


def test_dirichlet_half_uses_the_labels_that_make_up_a_real_share_when_nothing_is_unseen_by_presence():
    from data.partition import DOMINANT_SHARE

    train = np.repeat(np.arange(CLASSES), 600)
    kwargs = dict(num_classes=CLASSES, num_experts=5, num_train_clients=20, num_test_clients=5, labels_per_client=4)
    p = make_partition(train, np.repeat(np.arange(CLASSES), 100), mode="dirichlet", dirichlet_alpha=0.5, **kwargs)
    train_sets = [set(labels) for labels in p.client_labels[: p.num_train_clients]]
    test_sets = p.client_labels[p.num_train_clients :]
    # With alpha 0.5 nearly every client holds nearly every label: no 4-label set is unseen by presence...
    assert all(any(set(labels) <= held for held in train_sets) for labels in test_sets)
    for labels in test_sets:  # ...so no client may hold a real share of every label of a test client.
        for idx in p.train_indices[: p.num_train_clients]:
            counts = np.bincount(train[idx], minlength=CLASSES)
            assert not all(counts[y] >= DOMINANT_SHARE * len(idx) for y in labels), labels
