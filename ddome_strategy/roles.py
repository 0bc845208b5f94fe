"""The project's one role layout: which partition id is an anchor, a normal training
client or an unseen test client. The strategy, the data partition and the benchmark's
baselines all read it from here."""

from __future__ import annotations

from collections.abc import Callable, Mapping

ANCHOR, NORMAL, TEST = "anchor", "normal", "test"

RoleOf = Callable[[int], tuple[str, int]]
"""Maps a client's partition id to its role and, for anchors, its expert (else -1)."""


def role_in_layout(partition_id: int, num_experts: int, num_train_clients: int) -> tuple[str, int]:
    """The role of ``partition_id``: ids ``0..M-1`` are anchors (anchor ``i`` tied to
    expert ``i``), ``M..S-1`` normal training clients, and ``S..`` unseen test clients.

    Returns
    -------
    tuple[str, int]
        ``(ANCHOR, i)``, ``(NORMAL, -1)`` or ``(TEST, -1)``.
    """
    if partition_id < num_experts:
        return ANCHOR, partition_id
    if partition_id < num_train_clients:
        return NORMAL, -1
    return TEST, -1


def layout_roles(num_experts: int, num_train_clients: int, *, anchors: bool = True) -> RoleOf:
    """:func:`role_in_layout` as a ``role_of`` callable for :class:`~ddome_strategy.DDOME`.

    ``anchors=False`` is the layout of methods without anchors (the benchmark's FedMix
    and Avg-Ensembles): every training client is a normal client.
    """

    def role_of(partition_id: int) -> tuple[str, int]:
        role, expert = role_in_layout(partition_id, num_experts, num_train_clients)
        return (NORMAL, -1) if role == ANCHOR and not anchors else (role, expert)

    return role_of


def declared_role(node: Mapping) -> dict:
    """A node's reply to the role query from its node config: ``role`` (and ``expert``
    for an anchor) and ``partition-id``, whichever it sets; ``ValueError`` if they are wrong."""
    declared = {}
    if "partition-id" in node:
        declared["partition-id"] = int(node["partition-id"])
    if "role" in node:
        if node["role"] not in (ANCHOR, NORMAL, TEST):
            raise ValueError(f"node config role={node['role']!r} is not one of {ANCHOR}, {NORMAL}, {TEST}.")
        declared["role"] = str(node["role"])
        if node["role"] == ANCHOR:
            if "expert" not in node:
                raise ValueError("node config role='anchor' needs expert=<i> (the expert it anchors).")
            declared["expert"] = int(node["expert"])
    return declared
