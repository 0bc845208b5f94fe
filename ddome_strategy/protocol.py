"""What DDOME's server and clients exchange: message types, record names, the set-up
(client configuration, common expert) each node receives once, and the rules a reply
must follow (:func:`reply_problem`). The written contract is ``docs/protocol.md``.

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

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MessageType, MetricRecord, RecordDict

from .aggregation import MAX_NUM_EXAMPLES, check_update

# The version of this contract (docs/protocol.md), sent in the client configuration
# (key VERSION_KEY). A change of the major number breaks existing ClientApps.
PROTOCOL_VERSION = "1.0"
VERSION_KEY = "protocol-version"

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
PER_ROUND_KEYS = ("server-round", "experts", "role", "generalist-expert")


def check_client_config(client_config: Mapping[str, object]) -> None:
    """Refuse a client configuration that would shadow a per-round value or the
    protocol version (the strategy writes both)."""
    clash = sorted(set(client_config) & set(PER_ROUND_KEYS))
    if clash:
        raise ValueError(
            f"client_config must not set {clash[0]!r}: the strategy writes it into every message "
            f"(per-round keys: {', '.join(PER_ROUND_KEYS)})."
        )
    if VERSION_KEY in client_config:
        raise ValueError(f"client_config must not set {VERSION_KEY!r}: the strategy writes it ({PROTOCOL_VERSION}).")


def check_version(client_config: Mapping[str, object]) -> None:
    """Refuse (``ValueError``) a client configuration of another major protocol version
    than this ClientApp's; one without ``protocol-version`` (an older server) passes."""
    version = str(client_config.get(VERSION_KEY, PROTOCOL_VERSION))
    if version.split(".")[0] != PROTOCOL_VERSION.split(".")[0]:
        raise ValueError(f"the server speaks DDOME protocol {version}, this ClientApp {PROTOCOL_VERSION}.")


# The rules a reply must follow, as the log and docs/protocol.md name them.
RULE_ROLE_CONFIG = 'a role reply holds a ConfigRecord "config" with partition-id or role'
RULE_PARTITION_ID = "partition-id, if sent, is an int >= 0"
RULE_ROLE = "role, if sent, is anchor, normal or test"
RULE_ANCHOR_EXPERT = "an anchor sends expert, an int in 0..num-experts-1"
RULE_METRICS_RECORD = 'metrics go in a MetricRecord named "metrics"'
RULE_GATE_SCORES = 'metrics record "metrics" holds gate-scores (num-experts floats in [0, 1] summing to 1)'
RULE_TRAIN_ARRAYS = 'a train reply holds an ArrayRecord named "arrays"'
RULE_SAME_ARRAYS = 'arrays record "arrays" holds exactly the arrays sent, with their shapes and dtypes, all finite'
RULE_TRAIN_EXAMPLES = 'metrics record "metrics" holds num-examples (int > 0)'
RULE_EVAL_EXAMPLES = 'metrics record "metrics" holds num-examples (int >= 0)'
RULE_TRAIN_NUMBERS = "train-loss and routing-acc, if sent, are numbers"
RULE_ZERO_SHOT = 'metrics record "metrics" holds zero-shot-acc (a number)'


def _broken(rule: str, detail: str = "") -> str:
    return f"breaks protocol rule '{rule}'" + (f" ({detail})" if detail else "")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _record_found(content: RecordDict, name: str) -> str:
    """What stands in ``content`` instead of the expected record ``name``, for the log."""
    if name in content:
        return f"{name!r} is a {type(content[name]).__name__}"
    found = [f"{type(r).__name__} {k!r}" for k, r in content.items()]
    return "found " + ", ".join(found) if found else "the reply is empty"


def gate_scores(content: RecordDict, num_experts: int) -> np.ndarray | str:
    """The mean gate scores of a routing reply, or why they are unusable.

    Valid scores are ``num_experts`` finite probabilities in ``[0, 1]`` summing to 1
    (the mean over the client's samples of the gate's softmax).
    """
    record = content.metric_records.get(METRICS)
    if record is None or "gate-scores" not in record:
        return "no gate-scores"
    try:
        scores = np.asarray(record["gate-scores"], dtype=np.float64)
    except (TypeError, ValueError):
        return "gate-scores are not numbers"
    if scores.shape != (num_experts,):
        return f"gate-scores have shape {scores.shape}, expected ({num_experts},)"
    if not np.isfinite(scores).all():
        return "gate-scores have NaN or Inf values"
    if (scores < 0).any() or (scores > 1).any() or abs(scores.sum() - 1) > 1e-3:
        return "gate-scores are not a probability vector"
    return scores


def _role_problem(content: RecordDict, num_experts: int | None) -> str | None:
    config = content.config_records.get(CONFIG)
    if config is None:
        return _broken(RULE_ROLE_CONFIG, _record_found(content, CONFIG))
    if "partition-id" not in config and "role" not in config:
        return _broken(RULE_ROLE_CONFIG, f"it holds {sorted(config)}")
    pid = config.get("partition-id")
    if pid is not None and not (_is_int(pid) and pid >= 0):
        return _broken(RULE_PARTITION_ID, f"got {pid!r}")
    role = config.get("role")
    if role is not None and role not in ("anchor", "normal", "test"):
        return _broken(RULE_ROLE, f"got {role!r}")
    if role == "anchor":
        expert = config.get("expert")
        if not _is_int(expert) or (num_experts is not None and not 0 <= expert < num_experts):
            return _broken(
                RULE_ANCHOR_EXPERT, f"got {expert!r}" + (f", num-experts={num_experts}" if num_experts else "")
            )
    return None


def _metrics(content: RecordDict) -> MetricRecord | str:
    record = content.metric_records.get(METRICS)
    return record if record is not None else _broken(RULE_METRICS_RECORD, _record_found(content, METRICS))


def _count_problem(metrics: MetricRecord, rule: str, low: int) -> str | None:
    count = metrics.get("num-examples")
    if count is None:
        return _broken(rule, f"no num-examples among {sorted(metrics)}")
    if not _is_int(count):
        return _broken(rule, f"got {count!r}")
    if not low <= count <= MAX_NUM_EXAMPLES:
        return _broken(rule, f"got {count}" + (f", above {MAX_NUM_EXAMPLES}" if count > MAX_NUM_EXAMPLES else ""))
    return None


def reply_problem(
    message_type: str,
    content: RecordDict,
    *,
    num_experts: int | None = None,
    sent: ArrayRecord | None = None,
) -> str | None:
    """Which rule of the protocol (docs/protocol.md) a reply's content breaks, or ``None``.

    Parameters
    ----------
    message_type : str
        The type of the message the reply answers (``ROLE_QUERY``, ``ROUTE_QUERY``,
        ``TRAIN`` or ``EVALUATE``).
    content : RecordDict
        The reply's content (an error reply has none: the caller handles it).
    num_experts : int, optional
        M: checks an anchor's expert and the length of the gate scores (a routing
        reply needs it).
    sent : ArrayRecord, optional
        The arrays a train message sent: a train reply must return exactly these.

    Returns
    -------
    str | None
        ``"breaks protocol rule '<rule>' (<what was found>)"``, or ``None`` if the
        reply follows the protocol.
    """
    if message_type == ROLE_QUERY:
        return _role_problem(content, num_experts)
    metrics = _metrics(content)
    if isinstance(metrics, str):
        return metrics
    if message_type == ROUTE_QUERY:
        if num_experts is None:
            raise ValueError("a routing reply is checked against num_experts")
        scores = gate_scores(content, num_experts)
        return _broken(RULE_GATE_SCORES, scores) if isinstance(scores, str) else None
    if message_type == TRAIN:
        arrays = content.array_records.get(ARRAYS)
        if arrays is None:
            return _broken(RULE_TRAIN_ARRAYS, _record_found(content, ARRAYS))
        problem = _count_problem(metrics, RULE_TRAIN_EXAMPLES, 1)
        if problem:
            return problem
        wrong = {k: metrics[k] for k in ("train-loss", "routing-acc") if k in metrics and not _is_number(metrics[k])}
        if wrong:
            return _broken(RULE_TRAIN_NUMBERS, f"got {wrong}")
        if sent is not None and (reason := check_update(arrays, sent, metrics["num-examples"])):
            return _broken(RULE_SAME_ARRAYS, reason)
        return None
    if message_type == EVALUATE:
        problem = _count_problem(metrics, RULE_EVAL_EXAMPLES, 0)
        if problem:
            return problem
        if not _is_number(metrics.get("zero-shot-acc")):
            return _broken(RULE_ZERO_SHOT, f"got {metrics.get('zero-shot-acc')!r}")
        return None
    raise ValueError(f"no reply rules for message type {message_type!r}")


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
        self.client_config = ConfigRecord({**client_config, VERSION_KEY: PROTOCOL_VERSION})
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
