"""The paper's partitions: anchors with disjoint label groups, label-skewed clients,
and unseen test clients holding label combinations no training client has."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ddome_strategy.roles import role_in_layout

PARTITION_MODES = ("grouped", "free", "dirichlet")
EVALUATION_SPLITS = ("test", "validation")
# Dirichlet mode's anchors: "literal" (the spec: a Dirichlet mix like every client) or
# "group" (each anchor holds its own label group, so the anchors still define experts).
DIRICHLET_ANCHORS = ("literal", "group")


@dataclass(frozen=True)
class PartitionPlan:
    """Who holds what. Partition ids ``0..M-1`` are the anchors (anchor ``i`` tied to
    expert ``i``), ``M..S-1`` normal training clients, ``S..S+T-1`` unseen test clients
    (the layout of :func:`ddome_strategy.roles.role_in_layout`)."""

    num_experts: int
    num_train_clients: int
    num_test_clients: int
    client_labels: tuple[tuple[int, ...], ...]
    train_indices: tuple[np.ndarray, ...]
    eval_indices: tuple[np.ndarray, ...]
    public_indices: np.ndarray
    eval_split: str = "test"
    """Split that ``eval_indices`` index: ``"test"``, or ``"train"`` when evaluating on
    the validation slice of the training split (for tuning, never touching test data)."""

    @property
    def num_partitions(self) -> int:
        """Training plus test clients."""
        return self.num_train_clients + self.num_test_clients

    def role(self, partition_id: int) -> str:
        """``"anchor"``, ``"normal"`` or ``"test"``."""
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.num_partitions - 1}.")
        return role_in_layout(partition_id, self.num_experts, self.num_train_clients)[0]


def _check(ok: bool, sentence: str) -> None:
    if not ok:
        raise ValueError(sentence)


def _public_split(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A stratified share of the training split, held out from every client."""
    picked = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        picked.append(members[: int(round(fraction * len(members)))])
    return np.sort(np.concatenate(picked))


def _draw(pools: dict[int, np.ndarray], counts: dict[int, int], rng) -> np.ndarray:
    """``counts[label]`` distinct indices from each label's pool."""
    parts = [rng.choice(pools[y], size=min(n, len(pools[y])), replace=False) for y, n in counts.items() if n > 0]
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)


def _even_counts(labels: tuple[int, ...], total: int) -> dict[int, int]:
    base, extra = divmod(total, len(labels))
    return {y: base + (i < extra) for i, y in enumerate(labels)}


def _group_sets(groups: list[tuple[int, ...]], per_client: int, rng) -> list[tuple[int, ...]]:
    """Every union of ``per_client`` anchor groups, as sorted label tuples, in random order."""
    combos = list(itertools.combinations(range(len(groups)), per_client))
    return [tuple(sorted(y for g in combos[i] for y in groups[g])) for i in rng.permutation(len(combos))]


def _seen(candidate: tuple[int, ...], taken: list[frozenset]) -> bool:
    """Whether some training client holds every label of ``candidate``.

    A client holding a superset has seen the combination, so equality alone is not enough
    (Dirichlet clients hold label sets of any size).
    """
    labels = frozenset(candidate)
    return any(labels <= held for held in taken)


# In Dirichlet mode a client "holds" a label for the unseen-combination rule when it has any
# sample of it; where no combination is left unseen that way (large alpha: every client
# holds nearly every label), when the label makes up at least this share of its samples.
DOMINANT_SHARE = 0.05


def _dominant_labels(train_labels: np.ndarray, train_indices: list[np.ndarray]) -> list[frozenset]:
    """Each training client's labels that make up at least ``DOMINANT_SHARE`` of its samples."""
    held = []
    for idx in train_indices:
        labels, counts = np.unique(train_labels[idx], return_counts=True)
        held.append(frozenset(labels[counts >= DOMINANT_SHARE * max(len(idx), 1)].tolist()))
    return held


def _unseen_dirichlet_sets(
    groups, taken, dominant, num_classes: int, labels_per_client: int, count: int, rng
) -> list[tuple[int, ...]]:
    """Dirichlet mode's test label sets: unions of anchor groups where they fit (as in
    grouped mode), else any labels; unseen by every label a client holds or, where that
    leaves too few (large alpha), by the labels that make up a real share of its data."""
    per_client, rest = divmod(labels_per_client, len(groups[0]))
    for held in (taken, dominant):
        if not rest and per_client >= 2:
            unseen = [s for s in _group_sets(groups, per_client, rng) if not _seen(s, held)]
            if len(unseen) >= count:
                return unseen[:count]
        try:
            return _unseen_free_sets(held, num_classes, labels_per_client, count, rng)
        except ValueError:
            if held is dominant:
                raise
    raise AssertionError("unreachable: the loop returns or raises")


def _unseen_free_sets(taken: list[frozenset], num_classes: int, size: int, count: int, rng) -> list[tuple[int, ...]]:
    """``count`` distinct label sets of ``size`` labels, none of them within a set of ``taken``."""
    sets: list[tuple[int, ...]] = []
    for _ in range(10_000):
        if len(sets) == count:
            break
        candidate = tuple(sorted(rng.choice(num_classes, size=size, replace=False).tolist()))
        if candidate not in sets and not _seen(candidate, taken):
            sets.append(candidate)
    if len(sets) == count:
        return sets
    # Sampling rarely fails unless few sets are left: list them, so only a truly
    # impossible request raises (sampling first keeps earlier seeds' plans unchanged).
    if math.comb(num_classes, size) <= 100_000:
        options = [c for c in itertools.combinations(range(num_classes), size) if not _seen(c, taken)]
        if len(options) >= count:
            return [options[i] for i in rng.permutation(len(options))[:count]]
    raise ValueError(
        f"num-test-clients={count} is more than the label combinations of {size} labels "
        "that no training client holds; lower it or change labels-per-client."
    )


def make_partition(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    *,
    num_classes: int,
    num_experts: int,
    num_train_clients: int,
    num_test_clients: int,
    labels_per_client: int,
    mode: str = "grouped",
    dirichlet_alpha: float = 0.1,
    dirichlet_anchors: str = "literal",
    samples_per_client: int = 300,
    eval_samples_per_client: int = 200,
    public_fraction: float = 0.1,
    validation_fraction: float = 0.1,
    evaluation_split: str = "test",
    seed: int = 0,
) -> PartitionPlan:
    """Partition a dataset the way the paper does (quantity-based label skew).

    Parameters
    ----------
    train_labels, test_labels : np.ndarray
        Labels of the training and test splits.
    num_classes : int
        Number of classes.
    num_experts : int
        M: the number of anchors, one per expert, each with a disjoint group of
        ``num_classes // M`` labels.
    num_train_clients : int
        S: training clients, anchors included.
    num_test_clients : int
        T: unseen test clients; each holds all test images of its labels, a set of
        ``labels_per_client`` labels no training client holds, not even within a larger
        set of its labels: a union of anchor groups
        in "grouped" mode (and in "dirichlet" mode where that fits), any labels in "free".
    labels_per_client : int
        Labels of a normal or test client (a multiple of the group size in "grouped").
    mode : str (default: "grouped")
        "grouped": a client's labels are a union of whole anchor groups (the paper's
        reading); "free": labels drawn independently of the groups; "dirichlet":
        every training client's label mix drawn from Dir(``dirichlet_alpha``).
    dirichlet_alpha : float (default: 0.1)
        Concentration of the Dirichlet mode.
    dirichlet_anchors : str (default: "literal")
        Dirichlet mode's anchors: "literal" draws their mix like every other client's
        (the spec: "anchors included", so their labels overlap); "group" gives each
        anchor its own label group, evenly, as in grouped mode, and only the normal
        clients are Dirichlet.
    samples_per_client : int (default: 300)
        Training samples per training client, drawn from its labels; a sample may be
        dealt to several clients, never twice to one.
    eval_samples_per_client : int (default: 200)
        Held-out test-split samples of its labels per training client.
    public_fraction : float (default: 0.1)
        Share of the training split held out from all clients (for the common expert).
    validation_fraction : float (default: 0.1)
        Share of the training split held out from all clients as a validation split,
        carved out whatever ``evaluation_split`` says so that the training clients'
        data is the same in both modes.
    evaluation_split : str (default: "test")
        "test": clients are evaluated on the test split (the reported figures);
        "validation": on the validation split instead, with the same label sets (for
        choosing hyper-parameters without ever reading the test split).
    seed : int (default: 0)
        The partition is a function of the labels, the arguments and this seed.

    Returns
    -------
    PartitionPlan
        Labels and sample indices of every client and the public split.
    """
    _check(mode in PARTITION_MODES, f"partition-mode {mode!r} is not one of {', '.join(PARTITION_MODES)}.")
    _check(
        1 <= num_experts <= num_classes, f"num-experts={num_experts} must be between 1 and the {num_classes} classes."
    )
    _check(
        num_train_clients >= num_experts,
        f"num-train-clients={num_train_clients} must be at least num-experts={num_experts}.",
    )
    _check(num_test_clients >= 0, "num-test-clients must be non-negative.")
    _check(
        1 <= labels_per_client <= num_classes,
        f"labels-per-client={labels_per_client} must be between 1 and {num_classes}.",
    )
    _check(0 <= public_fraction < 1, "public-fraction must be in [0, 1).")
    _check(
        0 <= validation_fraction and public_fraction + validation_fraction < 1,
        "validation-fraction must be non-negative and leave data for the clients.",
    )
    _check(
        evaluation_split in EVALUATION_SPLITS,
        f"evaluation-split {evaluation_split!r} is not one of {', '.join(EVALUATION_SPLITS)}.",
    )
    _check(
        evaluation_split == "test" or validation_fraction > 0,
        "evaluation-split 'validation' needs validation-fraction > 0.",
    )
    _check(samples_per_client >= 1, "samples-per-client must be at least 1.")
    _check(eval_samples_per_client >= 0, "eval-samples-per-client must be non-negative.")
    _check(dirichlet_alpha > 0, f"dirichlet-alpha={dirichlet_alpha} must be positive.")
    _check(
        dirichlet_anchors in DIRICHLET_ANCHORS,
        f"dirichlet-anchors {dirichlet_anchors!r} is not one of {', '.join(DIRICHLET_ANCHORS)}.",
    )
    train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
    for split, labels in (("train", train_labels), ("test", test_labels)):
        _check(
            labels.size == 0 or 0 <= labels.min() <= labels.max() < num_classes,
            f"{split}_labels must lie in 0..{num_classes - 1} (num_classes={num_classes}).",
        )
    rng = np.random.default_rng(seed)

    public = _public_split(train_labels, public_fraction, rng)
    pool = np.setdiff1d(np.arange(len(train_labels)), public)
    validation = pool[_public_split(train_labels[pool], validation_fraction / (1 - public_fraction), rng)]
    pool = np.setdiff1d(pool, validation)
    train_pools = {y: pool[train_labels[pool] == y] for y in range(num_classes)}
    if evaluation_split == "validation":
        test_pools = {y: validation[train_labels[validation] == y] for y in range(num_classes)}
    else:
        test_pools = {y: np.flatnonzero(test_labels == y) for y in range(num_classes)}

    group_size = num_classes // num_experts
    shuffled = rng.permutation(num_classes)
    groups = [tuple(sorted(shuffled[i * group_size : (i + 1) * group_size].tolist())) for i in range(num_experts)]
    num_normal = num_train_clients - num_experts

    if mode == "grouped":
        _check(
            labels_per_client % group_size == 0,
            f"labels-per-client={labels_per_client} must be a multiple of the anchor group size {group_size} in grouped mode.",
        )
        per_client = labels_per_client // group_size
        # One group per client would give test clients exactly an anchor's labels.
        _check(
            per_client >= 2,
            f"labels-per-client={labels_per_client} must span at least two anchor groups of {group_size} labels in grouped mode.",
        )
        as_labels = _group_sets(groups, per_client, rng)
        _check(
            num_test_clients < len(as_labels),
            f"num-test-clients={num_test_clients} leaves none of the {len(as_labels)} group combinations for training clients; lower it or use partition-mode free.",
        )
        test_sets = as_labels[:num_test_clients]
        train_sets = as_labels[num_test_clients:]
        normal_sets = [train_sets[i % len(train_sets)] for i in range(num_normal)]
    else:
        normal_sets = [
            tuple(sorted(rng.choice(num_classes, labels_per_client, replace=False).tolist())) for _ in range(num_normal)
        ]
        test_sets = None

    train_indices, client_labels = [], []
    if mode == "dirichlet":
        for pid in range(num_train_clients):
            if pid < num_experts and dirichlet_anchors == "group":
                idx = _draw(train_pools, _even_counts(groups[pid], samples_per_client), rng)
            else:
                share = rng.dirichlet(np.full(num_classes, dirichlet_alpha))
                counts = rng.multinomial(samples_per_client, share)
                idx = _draw(train_pools, dict(enumerate(counts.tolist())), rng)
            train_indices.append(idx)
            client_labels.append(tuple(sorted(set(train_labels[idx].tolist()))))
    else:
        for labels in [*groups, *normal_sets]:
            train_indices.append(_draw(train_pools, _even_counts(labels, samples_per_client), rng))
            client_labels.append(labels)

    taken = [frozenset(labels) for labels in client_labels]
    if mode == "dirichlet":
        dominant = _dominant_labels(train_labels, train_indices)
        test_sets = _unseen_dirichlet_sets(
            groups, taken, dominant, num_classes, labels_per_client, num_test_clients, rng
        )
    if test_sets is None:
        # Free mode: any label sets no training client holds.
        test_sets = _unseen_free_sets(taken, num_classes, labels_per_client, num_test_clients, rng)

    eval_indices = [_draw(test_pools, _even_counts(labels, eval_samples_per_client), rng) for labels in client_labels]
    eval_indices += [np.sort(np.concatenate([test_pools[y] for y in labels])) for labels in test_sets]
    return PartitionPlan(
        num_experts,
        num_train_clients,
        num_test_clients,
        tuple(client_labels) + tuple(test_sets),
        tuple(train_indices),
        tuple(eval_indices),
        public,
        "train" if evaluation_split == "validation" else "test",
    )
