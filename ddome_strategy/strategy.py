"""The DDOME strategy: server-side gating, top-K expert dispatch and per-expert FedAvg."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from .aggregation import aggregate_moe, check_update
from .arrays import experts_in, moe_prefixes, select
from .moe import adaptive_experts

# Names of the records and config entries exchanged with the ClientApp.
ARRAYS = "arrays"
COMMON_EXPERT = "common-expert"
CONFIG = "config"
METRICS = "metrics"
TASK = "ddome-task"

ANCHOR, NORMAL, TEST = "anchor", "normal", "test"

# Seconds between polls for replies on grids that poll (Flower's simulation grid polls
# every 0.1 s by default; a DDOME round waits on two exchanges, routing then training).
POLL_INTERVAL = 0.01

RoleOf = Callable[[int], tuple[str, int]]
"""Maps a client's partition id to its role and, for anchors, its expert."""


def layout_roles(num_experts: int, num_train_clients: int) -> RoleOf:
    """The project's partition layout: ids ``0..M-1`` are anchors (anchor i tied to
    expert i), ``M..S-1`` normal training clients, and ``S..`` unseen test clients."""

    def role_of(partition_id: int) -> tuple[str, int]:
        if partition_id < num_experts:
            return ANCHOR, partition_id
        if partition_id < num_train_clients:
            return NORMAL, -1
        return TEST, -1

    return role_of


@dataclass
class _Client:
    node_id: int
    partition_id: int
    role: str
    expert: int


@dataclass
class _RoundTraffic:
    """Bytes of arrays (model weights, gate scores) sent and received in a round."""

    down: int = 0
    up: int = 0
    picks: list[int] = field(default_factory=list)


def evaluates(server_round: int, num_rounds: int, every: int, last: int = 0) -> bool:
    """Whether ``server_round`` is an evaluation round: every ``every`` rounds, every round
    of the last ``last`` rounds (reported figures are means over the last evaluations),
    and always the final round."""
    return server_round % every == 0 or server_round > num_rounds - last or server_round == num_rounds


def _array_bytes(content: RecordDict) -> int:
    return sum(r.count_bytes() for r in content.array_records.values())


def _mean(values: Iterable[float], weights: Iterable[float] | None = None) -> float:
    values = list(values)
    if not values:
        return float("nan")
    return float(np.average(values, weights=None if weights is None else list(weights)))


def _scalar(value: object) -> float:
    """A reported metric as a float; ``nan`` if it is not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value) if np.isfinite(value) else float("nan")


def _log_missing(phase: str, asked: set[int], replies: list[Message]) -> None:
    missing = sorted(asked - {r.metadata.src_node_id for r in replies})
    if missing:
        log(WARNING, "%s: no reply from nodes %s (dropped out or timed out); they are left out", phase, missing)


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


class DDOME(Strategy):
    """Dynamically Decentralized Orchestration of Mixture-of-Experts.

    Each round samples anchor and normal clients, asks the normal clients for their
    mean gate scores (routing), sends each client the gate plus only its top-K experts
    (an anchor gets its own expert), and averages every expert over the clients that
    trained it. Evaluation routes unseen test clients the same way, zero-shot.

    Parameters
    ----------
    num_experts : int
        Number of experts M. The global ``ArrayRecord`` holds ``gate.*`` and
        ``expert.<i>.*`` arrays for ``i < M`` (see :mod:`ddome_strategy.arrays`).
    role_of : RoleOf
        Maps a client's ``partition-id`` to ``(role, expert)``; see
        :func:`layout_roles`. Roles are learned from the clients with a query, so node
        ids may be arbitrary (as in a real deployment).
    top_k : int (default: 2)
        Experts sent to each normal or evaluated client (at most, with ``dispatch_mass``).
    min_top_k : int (default: 1)
        With ``dispatch_mass``: the fewest experts a client is sent.
    dispatch_mass : float (default: 0.0)
        Adaptive dispatch: send each client the fewest of its best-scored experts whose
        mean gate mass reaches this, between ``min_top_k`` and ``top_k``; 0 sends
        exactly ``top_k``.
    anchors_per_round : int (default: 5)
        Anchor clients sampled per round (without replacement).
    normal_per_round : int (default: 5)
        Normal clients sampled per round.
    common_expert : ArrayRecord, optional
        Frozen common-expert weights, sent once to each client with its first message
        so that it can compute its embeddings. ``None`` if clients already have it.
    client_config : Mapping, optional
        Entries added to every message's ``config`` record (data and training
        settings the ClientApp needs).
    eval_every : int (default: 5)
        Evaluate every this many rounds, and always at the last round.
    eval_last : int (default: 0)
        Also evaluate every round of the last ``eval_last`` rounds.
    eval_train_clients : bool (default: True)
        Also evaluate training clients (zero-shot routing on their held-out data).
    min_train_replies : int (default: 1)
        Fewer valid training replies than this skips the round's aggregation.
    min_nodes : int (default: 1)
        Wait until this many nodes are connected before the first round.
    timeout : float (default: 600)
        Seconds to wait for the replies of one phase (routing, training, evaluation).
    seed : int (default: 0)
        Seed of client sampling.
    on_metrics : Callable, optional
        Called as ``on_metrics(server_round, stage, metrics, arrays)`` after every
        aggregation, ``stage`` being ``"train"`` or ``"evaluate"``.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        num_experts: int,
        role_of: RoleOf,
        *,
        top_k: int = 2,
        min_top_k: int = 1,
        dispatch_mass: float = 0.0,
        anchors_per_round: int = 5,
        normal_per_round: int = 5,
        common_expert: ArrayRecord | None = None,
        client_config: Mapping[str, object] | None = None,
        eval_every: int = 5,
        eval_last: int = 0,
        eval_train_clients: bool = True,
        min_train_replies: int = 1,
        min_nodes: int = 1,
        timeout: float = 600.0,
        seed: int = 0,
        on_metrics: Callable[[int, str, dict, ArrayRecord], None] | None = None,
    ) -> None:
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top-k must be in [1, num-experts={num_experts}].")
        self.num_experts = num_experts
        self.role_of = role_of
        self.top_k = top_k
        self.min_top_k = min_top_k
        self.dispatch_mass = dispatch_mass
        self.anchors_per_round = anchors_per_round
        self.normal_per_round = normal_per_round
        self.common_expert = common_expert
        self.client_config = dict(client_config or {})
        self.eval_every = eval_every
        self.eval_last = eval_last
        self.eval_train_clients = eval_train_clients
        self.min_train_replies = min_train_replies
        self.min_nodes = min_nodes
        self.timeout = timeout
        self.on_metrics = on_metrics
        self.rng = np.random.default_rng(seed)
        self.num_rounds = 0
        self.round_offset = 0
        self.started = time.monotonic()
        self.clients: dict[int, _Client] = {}
        self.has_common_expert: set[int] = set()
        self.arrays = ArrayRecord()
        self.sent: dict[int, ArrayRecord] = {}
        self.evaluated: set[int] = set()
        self.traffic = _RoundTraffic()
        # Mean gate scores each client last reported in a routing phase (node id -> scores).
        self.scores: dict[int, list[float]] = {}
        # The last evaluation's routing, for the run's heatmap: partition id -> role,
        # anchor expert, mean gate scores and the experts sent.
        self.last_routing: dict[int, dict] = {}

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the strategy's settings."""
        log(
            INFO,
            "\t├── M=%d experts, top-K=%d, %d anchors + %d normal clients per round",
            self.num_experts,
            self.top_k,
            self.anchors_per_round,
            self.normal_per_round,
        )
        log(INFO, "\t└── evaluate every %d rounds", self.eval_every)

    def start(  # type: ignore[override]
        self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *, first_round: int = 1, **kwargs
    ) -> Result:
        """Run rounds ``first_round..num_rounds`` (see :meth:`Strategy.start`).

        ``first_round > 1`` resumes a run: round numbers (which seed the clients' local
        shuffling and decide when to evaluate) continue where the run stopped. Callbacks
        (``on_metrics``, ``evaluate_fn``) see the true round numbers; Flower's ``Result``
        counts from 1.
        """
        self.round_offset = first_round - 1
        self.started = time.monotonic()
        self.num_rounds = num_rounds
        self.arrays = initial_arrays
        evaluate_fn = kwargs.pop("evaluate_fn", None)
        if evaluate_fn is not None:
            offset = self.round_offset
            kwargs["evaluate_fn"] = lambda server_round, arrays: evaluate_fn(server_round + offset, arrays)
        if isinstance(getattr(grid, "pull_interval", None), float) and grid.pull_interval > POLL_INTERVAL:
            grid.pull_interval = POLL_INTERVAL  # 20% less time per simulated round, docs/performance.md
        return super().start(grid, initial_arrays, num_rounds - self.round_offset, **kwargs)

    def _eta(self, server_round: int) -> str:
        """Seconds per round so far and the time the remaining rounds will take at that pace."""
        per_round = (time.monotonic() - self.started) / max(1, server_round - self.round_offset)
        left = round(per_round * (self.num_rounds - server_round))
        return f"{per_round:.1f} s/round, ETA {left // 60}m{left % 60:02d}s"

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this strategy exactly.

        Returns
        -------
        dict
            The client-sampling RNG state (plain ints and strings, safe for
            ``torch.load(weights_only=True)``).
        """
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. Clients are re-discovered and are sent the common
        expert again (a restarted server cannot know what they kept)."""
        self.rng.bit_generator.state = state["rng"]

    def _message(self, node_id: int, arrays: ArrayRecord, config: dict, message_type: str) -> Message:
        content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**self.client_config, **config})})
        if self.common_expert is not None and node_id not in self.has_common_expert:
            content[COMMON_EXPERT] = self.common_expert
            self.has_common_expert.add(node_id)
        self.traffic.down += _array_bytes(content)
        return Message(content=content, dst_node_id=node_id, message_type=message_type)

    def _good_replies(self, replies: Iterable[Message], phase: str) -> list[Message]:
        good = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                # The node may have restarted and lost its embeddings: resend the
                # common expert next time.
                self.has_common_expert.discard(node)
                log(WARNING, "%s: node %s replied with an error: %s", phase, node, reply.error.reason)
                continue
            self.traffic.up += _array_bytes(reply.content)
            good.append(reply)
        return good

    def discover_clients(self, grid: Grid) -> None:
        """Ask every connected node we do not know yet for its ``partition-id``."""
        deadline = time.monotonic() + self.timeout
        while len(node_ids := list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(f"Only {len(node_ids)} of min-nodes={self.min_nodes} nodes connected.")
            log(
                INFO,
                "Waiting for nodes: %d of %d connected (in simulation, num-supernodes must be at least %d)",
                len(node_ids),
                self.min_nodes,
                self.min_nodes,
            )
            time.sleep(1.0)
        unknown = [n for n in node_ids if n not in self.clients]
        if not unknown:
            return
        queries = [
            Message(
                content=RecordDict({CONFIG: ConfigRecord({**self.client_config, TASK: "role"})}),
                dst_node_id=n,
                message_type=MessageType.QUERY,
            )
            for n in unknown
        ]
        for reply in self._good_replies(grid.send_and_receive(queries, timeout=self.timeout), "role query"):
            node = reply.metadata.src_node_id
            config = reply.content.config_records.get(CONFIG, ConfigRecord())
            pid = config.get("partition-id")
            if isinstance(pid, bool) or not isinstance(pid, int) or pid < 0:
                log(WARNING, "role query: node %s sent an invalid partition-id %r; it is left out", node, pid)
                continue
            role, expert = self.role_of(pid)
            if role == ANCHOR and not 0 <= expert < self.num_experts:
                log(
                    WARNING,
                    "role query: node %s claims anchor of expert %s of %d; it is left out",
                    node,
                    expert,
                    self.num_experts,
                )
                continue
            self.clients[node] = _Client(node, pid, role, expert)
        counts = {r: sum(c.role == r for c in self.clients.values()) for r in (ANCHOR, NORMAL, TEST)}
        log(INFO, "Clients: %d anchors, %d normal, %d unseen test", counts[ANCHOR], counts[NORMAL], counts[TEST])

    def _with_role(self, grid: Grid, role: str) -> list[_Client]:
        live = set(grid.get_node_ids())
        found = [c for c in self.clients.values() if c.role == role and c.node_id in live]
        return sorted(found, key=lambda c: c.partition_id)

    def _sample(self, clients: list[_Client], count: int) -> list[_Client]:
        picked = self.rng.choice(len(clients), size=min(count, len(clients)), replace=False)
        return [clients[i] for i in sorted(picked)]

    def route(self, grid: Grid, clients: list[_Client], server_round: int) -> dict[int, list[int]]:
        """Routing phase: send the gate, receive mean gate scores, pick top-K experts.

        Parameters
        ----------
        grid : Grid
            The grid to reach the clients through.
        clients : list
            Clients to route.
        server_round : int
            Current round.

        Returns
        -------
        dict[int, list[int]]
            Node id -> its top-K experts, for the clients that replied.
        """
        gate = select(self.arrays, moe_prefixes([]))
        queries = [
            self._message(c.node_id, gate, {TASK: "route", "server-round": server_round}, MessageType.QUERY)
            for c in clients
        ]
        asked = {c.node_id for c in clients}
        replies = list(grid.send_and_receive(queries, timeout=self.timeout))
        _log_missing("routing", asked, replies)
        chosen: dict[int, list[int]] = {}
        for reply in self._good_replies(replies, "routing"):
            node = reply.metadata.src_node_id
            if node not in asked or node in chosen:
                log(WARNING, "routing: node %s sent a reply it was not asked for; ignored", node)
                continue
            scores = gate_scores(reply.content, self.num_experts)
            if isinstance(scores, str):
                log(WARNING, "routing: node %s sent invalid gate scores (%s); it is left out", node, scores)
                continue
            chosen[node] = adaptive_experts(scores, self.top_k, self.min_top_k, self.dispatch_mass)
            self.scores[node] = scores.tolist()
        return chosen

    def _dispatch(self, clients_experts: dict[int, list[int]], config: dict, message_type: str) -> list[Message]:
        messages = []
        for node, experts in clients_experts.items():
            part = select(self.arrays, moe_prefixes(experts))
            if message_type == MessageType.TRAIN:
                self.sent[node] = part  # what a valid update must match
            messages.append(self._message(node, part, {**config, "experts": experts}, message_type))
        return messages

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample anchors and normal clients, route the normal ones, dispatch top-K.

        Parameters
        ----------
        server_round : int
            The current round.
        arrays : ArrayRecord
            The global gate and experts.
        config : ConfigRecord
            Extra configuration sent to every training client.
        grid : Grid
            Used for the role query and the routing phase before training.

        Returns
        -------
        Iterable[Message]
            One message per sampled client: the gate plus its own expert (anchors) or
            its top-K experts (normal clients).
        """
        server_round += self.round_offset
        self.arrays = arrays
        self.traffic = _RoundTraffic()
        self.sent = {}
        self.discover_clients(grid)
        anchors = self._sample(self._with_role(grid, ANCHOR), self.anchors_per_round)
        normals = self._sample(self._with_role(grid, NORMAL), self.normal_per_round)
        routed = self.route(grid, normals, server_round)
        self.traffic.picks = [e for experts in routed.values() for e in experts]
        train_config = {**dict(config), TASK: "train", "server-round": server_round}
        return [
            *self._dispatch(
                {c.node_id: [c.expert] for c in anchors}, {**train_config, "role": ANCHOR}, MessageType.TRAIN
            ),
            *self._dispatch(routed, {**train_config, "role": NORMAL}, MessageType.TRAIN),
        ]

    def _reply_order(self, reply: Message) -> tuple[int, int]:
        """Sort key of a reply: its client's partition id, else (after those) its node id.

        Arrival order varies (under Ray it does from run to run), and floating-point sums
        depend on their order: a fixed order gives bit-identical aggregates on every grid.
        """
        node = reply.metadata.src_node_id
        client = self.clients.get(node)
        return (0, client.partition_id) if client is not None else (1, node)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Average the gate over all replies and each expert over its trainers.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            Training replies; errors and invalid updates are logged and left out.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The new global arrays (``None`` if fewer than ``min_train_replies`` valid
            replies arrived, so the round is skipped) and the round's metrics.
        """
        server_round += self.round_offset
        updates, losses, weights, anchor_acc = [], [], [], []
        answered: set[int] = set()
        # Sum updates, losses and accuracies in partition order, whatever the arrival order.
        replies = sorted(replies, key=self._reply_order)
        _log_missing("train", set(self.sent), replies)
        for reply in self._good_replies(replies, "train"):
            node = reply.metadata.src_node_id
            if node not in self.sent or node in answered:
                log(WARNING, "train: node %s sent an update it was not asked for; rejected", node)
                continue
            answered.add(node)
            metrics = reply.content.metric_records.get(METRICS, MetricRecord())
            update = reply.content.array_records.get(ARRAYS, ArrayRecord())
            n = metrics.get("num-examples")
            reason = check_update(update, self.sent.get(node, ArrayRecord()), n)
            if reason:
                log(WARNING, "train: rejected the update of node %s: %s", node, reason)
                continue
            updates.append((update, float(n)))
            if np.isfinite(loss := _scalar(metrics.get("train-loss"))):
                losses.append(loss)
                weights.append(float(n))
            if np.isfinite(acc := _scalar(metrics.get("routing-acc"))):
                anchor_acc.append(acc)
        trained = {e for u, _ in updates for e in experts_in(u)}
        metrics = {
            "train-loss": _mean(losses, weights),
            "anchor-routing-acc": _mean(anchor_acc),
            "num-replies": len(updates),
            "experts-trained": len(trained),
            "bytes-down": self.traffic.down,
            "bytes-up": self.traffic.up,
            "bytes-total": self.traffic.down + self.traffic.up,
            "expert-picks": np.bincount(self.traffic.picks, minlength=self.num_experts).tolist(),
        }
        if len(updates) < self.min_train_replies:
            log(
                WARNING,
                "round %d skipped: %d valid replies < min-train-replies=%d",
                server_round,
                len(updates),
                self.min_train_replies,
            )
            new_arrays = None
        else:
            new_arrays = self.arrays = aggregate_moe(self.arrays, updates)
        log(
            INFO,
            "round %d/%d | train loss %.4f | anchor routing acc %.3f | %.2f MB | experts picked %s | %s",
            server_round,
            self.num_rounds,
            metrics["train-loss"],
            metrics["anchor-routing-acc"],
            metrics["bytes-total"] / 1e6,
            metrics["expert-picks"],
            self._eta(server_round),
        )
        if self.on_metrics:
            self.on_metrics(server_round, "train", metrics, self.arrays)
        return new_arrays, MetricRecord(metrics)

    # ------------------------------------------------------------------ evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Route the evaluation clients with the gate and send each its top-K experts.

        Parameters
        ----------
        server_round : int
            The current round; evaluation runs every ``eval_every`` rounds, every
            round of the last ``eval_last`` and at the last one.
        arrays : ArrayRecord
            The global gate and experts.
        config : ConfigRecord
            Extra configuration sent to every evaluated client.
        grid : Grid
            Used for the routing phase.

        Returns
        -------
        Iterable[Message]
            One message per routed client with the gate and its top-K experts.
        """
        server_round += self.round_offset
        if not evaluates(server_round, self.num_rounds, self.eval_every, self.eval_last):
            return []
        self.arrays = arrays
        self.discover_clients(grid)
        clients = self._with_role(grid, TEST)
        if self.eval_train_clients:
            clients += self._with_role(grid, ANCHOR) + self._with_role(grid, NORMAL)
        routed = self.route(grid, clients, server_round)
        self.evaluated = set(routed)
        self.last_routing = {
            self.clients[n].partition_id: {
                "role": self.clients[n].role,
                "expert": self.clients[n].expert,
                "scores": self.scores[n],
                "chosen": experts,
            }
            for n, experts in routed.items()
        }
        eval_config = {**dict(config), TASK: "evaluate", "server-round": server_round}
        return self._dispatch(routed, eval_config, MessageType.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Average each metric over the test clients and over the training clients.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            Evaluation replies.

        Returns
        -------
        MetricRecord | None
            ``test/<metric>`` (unseen clients, the zero-shot figures) and
            ``train/<metric>`` means over clients, or ``None`` if nothing arrived.
        """
        server_round += self.round_offset
        per_group: dict[str, dict[str, list[float]]] = {}
        answered: set[int] = set()
        # Means in partition order, whatever the arrival order (see _reply_order).
        for reply in self._good_replies(sorted(replies, key=self._reply_order), "evaluate"):
            node = reply.metadata.src_node_id
            client = self.clients.get(node)
            record = reply.content.metric_records.get(METRICS)
            if client is None or node not in self.evaluated or node in answered or record is None:
                log(WARNING, "evaluate: ignored an unexpected or malformed reply of node %s", node)
                continue
            answered.add(node)
            group = per_group.setdefault("test" if client.role == TEST else "train", {})
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    group.setdefault(key, []).append(float(value))
        if not per_group:
            return None
        metrics = {
            f"{group}/{key}": _mean(v for v in values if np.isfinite(v))
            for group, by_key in per_group.items()
            for key, values in by_key.items()
            if key != "num-examples"
        }
        metrics.update({f"{g}/num-clients": len(v.get("num-examples", [])) for g, v in per_group.items()})
        log(
            INFO,
            "round %d | zero-shot acc on unseen clients %.4f (common expert %.4f) | training clients %.4f",
            server_round,
            metrics.get("test/zero-shot-acc", float("nan")),
            metrics.get("test/common-expert-acc", float("nan")),
            metrics.get("train/zero-shot-acc", float("nan")),
        )
        if self.on_metrics:
            self.on_metrics(server_round, "evaluate", metrics, self.arrays)
        return MetricRecord(metrics)
