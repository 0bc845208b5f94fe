"""What DDOME's server and clients exchange: message types, record names, and the
set-up (client configuration, common expert) each node receives once.

Messages are addressed with Flower's named actions (``"<category>.<action>"``, answered
by ``@app.query("route")`` and the like):

=================  ==========================  =======================================
message type       ClientApp handler           reply
=================  ==========================  =======================================
``query.role``     ``@app.query("role")``      ``config["role"]``, ``["expert"]``,
                                               ``["partition-id"]`` (each if known)
``query.route``    ``@app.query("route")``     ``metrics["gate-scores"]``
``train``          ``@app.train()``            the received arrays trained + metrics
``evaluate``       ``@app.evaluate()``         zero-shot metrics
=================  ==========================  =======================================
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, MessageType, RecordDict

# Records of a message's content.
ARRAYS = "arrays"
CONFIG = "config"  # the per-round values: PER_ROUND_KEYS (and a start's train_config)
CLIENT_CONFIG = "client-config"  # the run's client configuration: a node's first message only
COMMON_EXPERT = "common-expert"  # the frozen common expert: a node's first message only
METRICS = "metrics"

# Message types (Flower named actions).
ROLE_QUERY = f"{MessageType.QUERY}.role"
ROUTE_QUERY = f"{MessageType.QUERY}.route"
TRAIN = MessageType.TRAIN
EVALUATE = MessageType.EVALUATE

# The config entries the strategy writes into a message's CONFIG record.
PER_ROUND_KEYS = ("server-round", "experts", "role")


def check_client_config(client_config: Mapping[str, object]) -> None:
    """Refuse a client configuration that would shadow a per-round value."""
    clash = sorted(set(client_config) & set(PER_ROUND_KEYS))
    if clash:
        raise ValueError(
            f"client_config must not set {clash[0]!r}: the strategy writes it into every message "
            f"(per-round keys: {', '.join(PER_ROUND_KEYS)})."
        )


class NodeSetup:
    """What every node keeps for the whole run: the client configuration and, if any,
    the common expert. Both go with a node's first message only; a node that lost
    them (it replied with an error, or restarted) is :meth:`forget`-ten and gets them
    again with its next message.

    Parameters
    ----------
    client_config : Mapping
        The run's client configuration (data and training settings).
    common_expert : ArrayRecord, optional
        The frozen common expert; ``None`` if clients already have it.
    """

    def __init__(self, client_config: Mapping[str, object], common_expert: ArrayRecord | None = None) -> None:
        check_client_config(client_config)
        self.client_config = ConfigRecord(dict(client_config))
        self.common_expert = common_expert
        self.done: set[int] = set()

    def attach(self, node_id: int, content: RecordDict) -> RecordDict:
        """Add the set-up to ``content`` if ``node_id`` has not received it yet."""
        if node_id not in self.done:
            content[CLIENT_CONFIG] = self.client_config
            if self.common_expert is not None:
                content[COMMON_EXPERT] = self.common_expert
            self.done.add(node_id)
        return content

    def forget(self, node_id: int) -> None:
        """``node_id`` may have lost its set-up: send it again with its next message."""
        self.done.discard(node_id)
