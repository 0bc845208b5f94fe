"""The DDOME strategy: server-side gating, top-K expert dispatch and per-expert FedAvg."""

from __future__ import annotations

import io
import numbers
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info

from .aggregation import aggregate_moe
from .arrays import experts_in, layout_error, moe_prefixes, select
from .dispatch import adaptive_experts
from .protocol import (
    ARRAYS,
    CLIENT_CONFIG,
    COMMON_EXPERT,
    CONFIG,
    EVALUATE,
    METRICS,
    PER_ROUND_KEYS,
    ROLE_QUERY,
    ROUTE_QUERY,
    TRAIN,
    NodeSetup,
    gate_scores,
    reply_problem,
)
from .roles import ANCHOR, NORMAL, TEST, RoleOf, layout_roles

__all__ = [
    "ANCHOR",
    "ARRAYS",
    "CLIENT_CONFIG",
    "COMMON_EXPERT",
    "CONFIG",
    "DDOME",
    "EVALUATE",
    "METRICS",
    "NORMAL",
    "PER_ROUND_KEYS",
    "ROLE_QUERY",
    "ROUTE_QUERY",
    "TEST",
    "TRAIN",
    "Exchange",
    "Routing",
    "RoundResult",
    "evaluates",
    "gate_scores",
    "layout_roles",
    "sent_arrays",
]

# Seconds between polls for replies on grids that poll (Flower's simulation grid polls
# every 0.1 s by default; a DDOME round waits on two exchanges, routing then training).
POLL_INTERVAL = 0.01


@dataclass
class _Client:
    node_id: int
    partition_id: int | None  # None: a deployed node that declared only its role
    role: str
    expert: int

    @property
    def order(self) -> tuple[int, int]:
        """Stable sort key: partition id, else (after those) node id."""
        return (0, self.partition_id) if self.partition_id is not None else (1, self.node_id)

    @property
    def key(self) -> int:
        """The client's name in ``last_routing``: its partition id, else its node id."""
        return self.partition_id if self.partition_id is not None else self.node_id


@dataclass
class Exchange:
    """One phase's exchange with the clients: the replies without errors, and the array
    bytes (``ArrayRecord.count_bytes``) of the messages sent and of those replies."""

    replies: list[Message] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0

    @property
    def bytes(self) -> int:
        """Array bytes both ways."""
        return self.bytes_down + self.bytes_up


@dataclass
class Routing:
    """What a routing phase decided: node id -> the experts it is sent (in reply order),
    its mean gate scores, and the phase's exchange (its byte count)."""

    experts: dict[int, list[int]] = field(default_factory=dict)
    scores: dict[int, list[float]] = field(default_factory=dict)
    exchange: Exchange = field(default_factory=Exchange)


@dataclass
class RoundResult:
    """What one round produced: the new global arrays (``None``: the round was skipped)
    and the train and (in evaluation rounds) evaluate metrics."""

    arrays: ArrayRecord | None
    train_metrics: MetricRecord
    evaluate_metrics: MetricRecord | None = None


def sent_arrays(messages: Iterable[Message]) -> dict[int, ArrayRecord]:
    """Node id -> the arrays a training message sent it (what a valid update must match)."""
    return {m.metadata.dst_node_id: m.content[ARRAYS] for m in messages}


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


def _rejections(rejected: list[str]) -> str:
    """The end of a log line naming the replies rejected (the first one's rule)."""
    if not rejected:
        return ""
    more = f"; and {len(rejected) - 1} more" if len(rejected) > 1 else ""
    return f"; {len(rejected)} replies rejected for breaking the protocol ({rejected[0]}{more})"


def _check_count(name: str, value: object, low: int, high: int | None = None, high_name: str = "") -> None:
    """Refuse ``value`` unless it is an integer in ``[low, high]`` (``high_name=high`` in the message)."""
    valid = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not valid or value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high_name}={high}"
        raise ValueError(f"{name} must be an integer {bounds}, got {value!r}.")


def _check_timeout(value: object) -> None:
    """Refuse a ``timeout`` that is not a positive number of seconds (``inf``: wait for ever)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {value!r}.")


@contextmanager
def _polling_every(grid: Grid, interval: float) -> Iterator[None]:
    """Poll a grid that polls (Flower's simulation grid) for replies every ``interval``
    seconds inside the block, and give it back its own interval after it."""
    original = getattr(grid, "pull_interval", None)
    if not isinstance(original, float) or original <= interval:
        yield
        return
    grid.pull_interval = interval
    try:
        yield
    finally:
        grid.pull_interval = original


class DDOME(Strategy):
    """Dynamically Decentralized Orchestration of Mixture-of-Experts.

    Each round samples anchor and normal clients, asks the normal clients for their
    mean gate scores (routing), sends each client the gate plus only its top-K experts
    (an anchor gets its own expert), and averages every expert over the clients that
    trained it. Evaluation routes unseen test clients the same way, zero-shot. One
    round, phase by phase, is :meth:`run_round`.

    Parameters
    ----------
    num_experts : int
        Number of experts M. The global ``ArrayRecord`` holds ``gate.*`` and
        ``expert.<i>.*`` arrays for ``i < M`` (see :mod:`ddome_strategy.arrays`).
    role_of : RoleOf
        Maps a client's ``partition-id`` to ``(role, expert)``; see
        :func:`~ddome_strategy.roles.layout_roles`. Roles are learned from the clients
        with a query, so node ids may be arbitrary (as in a real deployment).
    top_k : int (default: 2)
        Experts sent to each normal or evaluated client (at most, with ``dispatch_mass``).
    min_top_k : int (default: 1)
        With ``dispatch_mass``: the fewest experts a client is sent.
    dispatch_mass : float (default: 0.0)
        Adaptive dispatch: send each client the fewest of its best-scored experts whose
        mean gate mass reaches this, between ``min_top_k`` and ``top_k``; 0 sends
        exactly ``top_k``.
    generalist : bool (default: False)
        Add expert ``M`` (the generalist): no anchor owns it, every client is sent it
        beside its own or top-K experts and trains it, and the gate scores it like the
        others (the arrays hold experts ``0..M`` and the gate ``M + 1`` outputs).
    anchors_per_round : int (default: 5)
        Anchor clients sampled per round (without replacement).
    normal_per_round : int (default: 5)
        Normal clients sampled per round.
    common_expert : ArrayRecord, optional
        Frozen common-expert weights, sent once to each client with its first message
        so that it can compute its embeddings. ``None`` if clients already have it.
    client_config : Mapping, optional
        The run's client configuration (data and training settings the ClientApp
        needs), sent once to each client with its first message (record
        ``client-config``); later messages carry only the per-round values
        (``server-round``, ``experts``, ``role``), which it must not contain.
    eval_every : int (default: 5)
        Evaluate every this many rounds, and always at the last round.
    eval_last : int (default: 0)
        Also evaluate every round of the last ``eval_last`` rounds.
    eval_train_clients : bool (default: True)
        Also evaluate training clients (zero-shot routing on their held-out data).
    min_train_replies : int (default: 1)
        Fewer valid training replies than this skips the round's aggregation (a round
        with no valid reply is skipped whatever this is).
    min_nodes : int (default: 1)
        Wait until this many nodes are connected before the first round.
    timeout : float (default: 600)
        Seconds to wait for the replies of each phase (role query, routing, training,
        evaluation routing, evaluation).
    seed : int (default: 0)
        Seed of client sampling.
    on_metrics : Callable, optional
        Called as ``on_metrics(server_round, stage, metrics, arrays)`` after every
        aggregation, ``stage`` being ``"train"`` or ``"evaluate"``.

    Raises
    ------
    ValueError
        If a setting cannot work: a count out of its range (``top_k`` and ``min_top_k``
        must be in ``1..num_experts``, ``eval_every`` at least 1, per-round counts
        non-negative and not both 0), ``dispatch_mass`` outside ``[0, 1]``, a timeout
        that is not positive, or a ``client_config`` that sets a per-round key.
    """

    def __init__(  # pylint: disable=too-many-arguments
        self,
        num_experts: int,
        role_of: RoleOf,
        *,
        top_k: int = 2,
        min_top_k: int = 1,
        dispatch_mass: float = 0.0,
        generalist: bool = False,
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
        # Refuse now what would fail, or silently do nothing, rounds into the run.
        _check_count("num_experts", num_experts, 1)
        _check_count("top_k", top_k, 1, num_experts, "num_experts")
        _check_count("min_top_k", min_top_k, 1, num_experts, "num_experts")
        valid_mass = isinstance(dispatch_mass, numbers.Real) and not isinstance(dispatch_mass, bool)
        if not valid_mass or not 0 <= dispatch_mass <= 1:  # NaN too
            raise ValueError(f"dispatch_mass must be in [0, 1] (0: always top_k experts), got {dispatch_mass!r}.")
        _check_count("anchors_per_round", anchors_per_round, 0)
        _check_count("normal_per_round", normal_per_round, 0)
        if anchors_per_round + normal_per_round == 0:
            raise ValueError("anchors_per_round + normal_per_round must be at least 1: no round would train a client.")
        _check_count("eval_every", eval_every, 1)
        _check_count("eval_last", eval_last, 0)
        _check_count("min_train_replies", min_train_replies, 0)
        _check_count("min_nodes", min_nodes, 0)
        _check_timeout(timeout)
        self.num_experts = num_experts
        self.role_of = role_of
        self.top_k = top_k
        self.min_top_k = min_top_k
        self.dispatch_mass = dispatch_mass
        # The generalist's expert index (after the M anchor-owned experts), or None.
        self.generalist = num_experts if generalist else None
        self.anchors_per_round = anchors_per_round
        self.normal_per_round = normal_per_round
        # Raises if client_config holds a per-round key (it would shadow it on the client).
        self.setup = NodeSetup(client_config or {}, common_expert)
        self.eval_every = eval_every
        self.eval_last = eval_last
        self.eval_train_clients = eval_train_clients
        self.min_train_replies = min_train_replies
        self.min_nodes = min_nodes
        self.nodes_awaited = False  # min_nodes is waited for once, before the first round
        self.timeout = timeout
        self.on_metrics = on_metrics
        self.rng = np.random.default_rng(seed)
        self.num_rounds = 0
        self.round_offset = 0
        self.started = time.monotonic()
        # The nodes whose role is known (node id -> client), learned by the discover phase.
        self.clients: dict[int, _Client] = {}
        # The global gate and experts: the start's, then each round's aggregate.
        self.arrays = ArrayRecord()
        # The last evaluation's routing, for the run's heatmap: partition id -> role,
        # anchor expert, mean gate scores and the experts sent.
        self.last_routing: dict[int, dict] = {}

    @property
    def total_experts(self) -> int:
        """Experts in the global arrays: the M anchor-owned ones and the generalist, if any."""
        return self.num_experts + (self.generalist is not None)

    @property
    def common_expert(self) -> ArrayRecord | None:
        """The frozen common expert sent with each node's first message."""
        return self.setup.common_expert

    @property
    def client_config(self) -> dict:
        """The client configuration sent with each node's first message."""
        return dict(self.setup.client_config)

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

    def _eta(self, server_round: int) -> str:
        """Seconds per round so far and the time the remaining rounds will take at that pace."""
        per_round = (time.monotonic() - self.started) / max(1, server_round - self.round_offset)
        left = round(per_round * (self.num_rounds - server_round))
        return f"{per_round:.1f} s/round, ETA {left // 60}m{left % 60:02d}s"

    def _known_as(self, node: int) -> str:
        """How the log names ``node`` beside its node id: its role and partition id
        (empty while its role is unknown)."""
        client = self.clients.get(node)
        if client is None:
            return ""
        role = f"anchor of expert {client.expert}" if client.role == ANCHOR else client.role
        return role if client.partition_id is None else f"{role}, partition-id {client.partition_id}"

    def _tag(self, node: int) -> str:
        """`` [<role>, partition-id <i>]`` to end a log line about ``node``, if known."""
        known = self._known_as(node)
        return f" [{known}]" if known else ""

    def _reject(self, node: int, phase: str, problem: str, outcome: str) -> None:
        """Log that ``node``'s reply in ``phase`` broke the protocol, and what follows."""
        log(WARNING, "node %s%s: %s reply %s; %s", node, self._tag(node), phase, problem, outcome)

    def _log_missing(self, phase: str, missing: set[int]) -> None:
        missing = sorted(missing)
        if missing:
            known = "; ".join(f"{n}: {self._known_as(n)}" for n in missing if self._known_as(n))
            log(
                WARNING,
                "%s: no reply from nodes %s (dropped out or timed out); they are left out%s",
                phase,
                missing,
                f" [{known}]" if known else "",
            )

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
        """Restore :meth:`state_dict`. Clients are re-discovered and are sent the client
        configuration and the common expert again (a restarted server cannot know what
        they kept)."""
        self.rng.bit_generator.state = state["rng"]

    def _message(self, node_id: int, arrays: ArrayRecord, config: dict, message_type: str) -> Message:
        """A message of ``arrays`` and the per-round ``config``, with the node's set-up
        (client configuration, common expert) if it has not received it yet."""
        content = self.setup.attach(node_id, RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(config)}))
        return Message(content=content, dst_node_id=node_id, message_type=message_type)

    def exchange(self, grid: Grid, phase: str, messages: Iterable[Message]) -> Exchange:
        """Send one phase's messages, wait up to ``timeout`` for the replies, and count
        the phase's array bytes.

        Nodes that do not reply are logged; a node that replies with an error (its own,
        or the SuperLink's for a node that went away) is logged and left out. Every node
        asked that gave no valid reply gets its set-up again with its next message: it
        may have restarted and lost it.

        Returns
        -------
        Exchange
            The replies without errors and the array bytes sent and received.
        """
        messages = list(messages)
        if not messages:
            return Exchange()
        replies = list(grid.send_and_receive(messages, timeout=self.timeout))
        asked = {m.metadata.dst_node_id for m in messages}
        # The SuperLink answers for a node it lost with an error from itself (node id 1):
        # the message it replies to names the node.
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in messages if m.metadata.message_id}
        good, answered, served = [], set(), set()
        for reply in replies:
            node = sent_to.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            answered.add(node)
            if reply.has_error():
                log(
                    WARNING, "%s: node %s replied with an error: %s%s", phase, node, reply.error.reason, self._tag(node)
                )
                continue
            good.append(reply)
            served.add(node)
        self._log_missing(phase, asked - answered)
        for node in asked - served:
            self.setup.forget(node)
        return Exchange(
            good, sum(_array_bytes(m.content) for m in messages), sum(_array_bytes(r.content) for r in good)
        )

    def _with_role(self, grid: Grid, role: str) -> list[_Client]:
        live = set(grid.get_node_ids())
        found = [c for c in self.clients.values() if c.role == role and c.node_id in live]
        return sorted(found, key=lambda c: c.order)

    def _sample(self, clients: list[_Client], count: int) -> list[_Client]:
        picked = self.rng.choice(len(clients), size=min(count, len(clients)), replace=False)
        return [clients[i] for i in sorted(picked)]

    def _reply_order(self, reply: Message) -> tuple[int, int]:
        """Sort key of a reply: its client's partition id, else (after those) its node id.

        Arrival order varies (under Ray it does from run to run), and floating-point sums
        depend on their order: a fixed order gives bit-identical aggregates on every grid.
        """
        node = reply.metadata.src_node_id
        client = self.clients.get(node)
        return client.order if client is not None else (2, node)

    # ------------------------------------------------------------------ the run
    def start(  # type: ignore[override]  # pylint: disable=too-many-arguments
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Run rounds ``first_round..num_rounds`` with :meth:`run_round`.

        The first seven parameters are those of Flower's :meth:`Strategy.start`, in its
        order. While the rounds run, a grid that polls for replies (Flower's simulation
        grid) polls every ``POLL_INTERVAL`` seconds; its own ``pull_interval`` is back
        when this returns or raises.

        Parameters
        ----------
        grid : Grid
            The grid to reach the clients through.
        initial_arrays : ArrayRecord
            The global gate and experts to start from.
        num_rounds : int (default: 3)
            The run's last round.
        timeout : float, optional
            Replaces the constructor's ``timeout`` (seconds per phase); ``None`` keeps it.
        train_config, evaluate_config : ConfigRecord, optional
            Extra per-round entries of every training / evaluation message.
        evaluate_fn : Callable, optional
            Called as ``evaluate_fn(server_round, arrays)`` before the first round
            (with ``first_round - 1``) and after every round, as in Flower's
            :meth:`Strategy.start`; a ``MetricRecord`` it returns goes in the result.
        first_round : int (default: 1)
            ``> 1`` resumes a run: round numbers (which seed the clients' local
            shuffling and decide when to evaluate) continue where the run stopped.

        Returns
        -------
        Result
            Flower's result; its rounds count from 1 (callbacks see the true numbers).

        Raises
        ------
        ValueError
            If ``initial_arrays`` is not a gate plus experts ``0..num_experts-1``, or
            ``timeout`` or ``first_round`` is impossible.
        """
        reason = layout_error(initial_arrays, self.total_experts)
        if reason:
            raise ValueError(f"initial_arrays {reason}.")
        _check_count("first_round", first_round, 1)
        if timeout is not None:
            _check_timeout(timeout)
            self.timeout = timeout
        self.round_offset = first_round - 1
        self.num_rounds = num_rounds
        self.started = time.monotonic()
        # The log lines of Flower's Strategy.start, so that its log filters apply alike.
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds - self.round_offset, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        result = Result()
        t_start = time.time()
        if evaluate_fn:
            res = evaluate_fn(self.round_offset, initial_arrays)
            log(INFO, "Initial global evaluation results: %s", res)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        self.arrays = initial_arrays
        aggregated = 0
        # 20% less time per simulated round (docs/performance.md), for this run only.
        with _polling_every(grid, POLL_INTERVAL):
            for server_round in range(first_round, num_rounds + 1):
                count = server_round - self.round_offset  # Flower's Result counts from 1
                log(INFO, "")
                log(INFO, "[ROUND %s/%s]", count, num_rounds - self.round_offset)
                outcome = self.run_round(grid, server_round, self.arrays, train_config, evaluate_config)
                if outcome.arrays is not None:
                    result.arrays = self.arrays = outcome.arrays
                    aggregated += 1
                log(INFO, "\t└──> Aggregated MetricRecord: %s", outcome.train_metrics)
                result.train_metrics_clientapp[count] = outcome.train_metrics
                if outcome.evaluate_metrics is not None:
                    log(INFO, "\t└──> Aggregated MetricRecord: %s", outcome.evaluate_metrics)
                    result.evaluate_metrics_clientapp[count] = outcome.evaluate_metrics
                if evaluate_fn:
                    log(INFO, "Global evaluation")
                    res = evaluate_fn(server_round, self.arrays)
                    log(INFO, "\t└──> MetricRecord: %s", res)
                    if res is not None:
                        result.evaluate_metrics_serverapp[count] = res
        if not aggregated and first_round <= num_rounds:
            log(
                WARNING,
                "no round from %d to %d aggregated a valid update (see the warnings above): the result's "
                "arrays are empty and the strategy's arrays are those it started from",
                first_round,
                num_rounds,
            )
        log(INFO, "")
        log(INFO, "Strategy execution finished in %.2fs", time.time() - t_start)
        log(INFO, "")
        log(INFO, "Final results:")
        log(INFO, "")
        for line in io.StringIO(str(result)):
            log(INFO, "\t%s", line.strip("\n"))
        log(INFO, "")
        return result

    def run_round(
        self,
        grid: Grid,
        server_round: int,
        arrays: ArrayRecord,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
    ) -> RoundResult:
        """One DDOME round, phase by phase; each phase that talks to the clients waits
        up to ``timeout``, logs the nodes that failed and counts its array bytes.

        Parameters
        ----------
        grid : Grid
            The grid to reach the clients through.
        server_round : int
            The round (the run's true number, also after a resume).
        arrays : ArrayRecord
            The global gate and experts at the start of the round.
        train_config, evaluate_config : ConfigRecord, optional
            Extra per-round entries of the training / evaluation messages.

        Returns
        -------
        RoundResult
            The new global arrays (``None`` if the round was skipped) and the metrics.
        """
        # 1. Discover: ask nodes that connected since the last round for their role.
        self.discover(grid)
        # 2. Route: sample anchors and normal clients; the normal ones score the experts
        #    with the gate (a query.route exchange) and each gets its top-K.
        anchors, normals = self.sample(grid)
        routing = self.route(grid, normals, server_round, arrays)
        # 3. Dispatch: the gate plus its own expert to each anchor, its top-K to each routed client.
        messages = self.configure_train(server_round, arrays, train_config, anchors=anchors, routing=routing)
        # 4. Train: the clients train what they received and send it back.
        training = self.exchange(grid, "train", messages)
        # 5. Aggregate: the gate over all valid updates, each expert over its trainers.
        new_arrays, train_metrics = self.aggregate_train(
            server_round, training.replies, sent=sent_arrays(messages), arrays=arrays
        )
        picks = [e for experts in routing.experts.values() for e in experts]
        traffic = {
            "bytes-down": routing.exchange.bytes_down + training.bytes_down,
            "bytes-up": routing.exchange.bytes_up + training.bytes_up,
            "bytes-total": routing.exchange.bytes + training.bytes,  # routing + training, not evaluation
            "expert-picks": np.bincount(picks, minlength=self.total_experts).tolist(),
            "bytes/route": routing.exchange.bytes,
            "bytes/train": training.bytes,
        }
        train_metrics = {**train_metrics, **traffic}
        arrays = arrays if new_arrays is None else new_arrays
        log(
            INFO,
            "round %d/%d | train loss %.4f | anchor routing acc %.3f | %.2f MB | experts picked %s | %s",
            server_round,
            self.num_rounds,
            train_metrics["train-loss"],
            train_metrics["anchor-routing-acc"],
            train_metrics["bytes-total"] / 1e6,
            traffic["expert-picks"],
            self._eta(server_round),
        )
        if self.on_metrics:
            self.on_metrics(server_round, "train", train_metrics, arrays)
        # 6. Evaluate (evaluation rounds only): route the evaluated clients the same way,
        #    send each its top-K, average their zero-shot metrics.
        evaluated = self.evaluation_clients(grid, server_round)
        if not evaluated:
            return RoundResult(new_arrays, MetricRecord(train_metrics))
        eval_routing = self.route(grid, evaluated, server_round, arrays, phase="evaluation routing")
        self.last_routing = {
            self.clients[n].key: {
                "role": self.clients[n].role,
                "expert": self.clients[n].expert,
                "scores": eval_routing.scores[n],
                "chosen": self.sent_experts(experts),  # the heatmap frames what the client was sent
            }
            for n, experts in eval_routing.experts.items()
        }
        messages = self.configure_evaluate(server_round, arrays, evaluate_config, routing=eval_routing)
        evaluation = self.exchange(grid, "evaluate", messages)
        eval_metrics = self.aggregate_evaluate(server_round, evaluation.replies, evaluated=set(eval_routing.experts))
        if eval_metrics is None:
            return RoundResult(new_arrays, MetricRecord(train_metrics))
        eval_metrics = {**eval_metrics, "bytes/evaluate": eval_routing.exchange.bytes + evaluation.bytes}
        if self.on_metrics:
            self.on_metrics(server_round, "evaluate", eval_metrics, arrays)
        return RoundResult(new_arrays, MetricRecord(train_metrics), MetricRecord(eval_metrics))

    # ------------------------------------------------------------------ phases
    def discover(self, grid: Grid) -> None:
        """Discover phase: ask every connected node we do not know yet for its role (a
        ``query.role`` message).

        A deployed node declares its ``role`` (and ``expert`` for an anchor) from its node
        config; a node that sends only its ``partition-id`` (the simulation) gets
        ``role_of(partition-id)``. Invalid replies and error replies (a node whose data
        folder cannot be read) are logged and the node is left out.
        """
        node_ids = self.wait_for_nodes(grid) if not self.nodes_awaited else list(grid.get_node_ids())
        unknown = [n for n in node_ids if n not in self.clients]
        if not unknown:
            return
        queries = [Message(content=RecordDict(), dst_node_id=n, message_type=ROLE_QUERY) for n in unknown]
        for reply in self.exchange(grid, "role query", queries).replies:
            node = reply.metadata.src_node_id
            problem = reply_problem(ROLE_QUERY, reply.content, num_experts=self.num_experts)
            if problem:
                self._reject(node, "role query", problem, "it is left out (and asked again next round)")
                continue
            client = self._client_of(node, reply.content.config_records[CONFIG])
            if isinstance(client, str):
                log(WARNING, "role query: node %s %s; it is left out", node, client)
                continue
            self.clients[node] = client
        counts = {r: sum(c.role == r for c in self.clients.values()) for r in (ANCHOR, NORMAL, TEST)}
        log(INFO, "Clients: %d anchors, %d normal, %d unseen test", counts[ANCHOR], counts[NORMAL], counts[TEST])

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """Wait, once per run, until ``min_nodes`` nodes are connected; return them.

        Later rounds go on with the nodes that are there: a node that is lost costs its
        own contribution, and one that comes back (or joins) is found by :meth:`discover`.

        Raises
        ------
        TimeoutError
            If fewer than ``min_nodes`` nodes connected within ``timeout`` seconds.
        """
        deadline = time.monotonic() + self.timeout
        while len(node_ids := list(grid.get_node_ids())) < self.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"Only {len(node_ids)} of min-nodes={self.min_nodes} nodes connected within {self.timeout:g} s."
                )
            log(INFO, "Waiting for nodes: %d of min-nodes=%d connected", len(node_ids), self.min_nodes)
            time.sleep(1.0)
        self.nodes_awaited = True
        return node_ids

    def _client_of(self, node: int, config: ConfigRecord) -> _Client | str:
        """The client a role reply that follows the protocol describes, or why
        ``role_of`` cannot place it."""
        pid = config.get("partition-id")
        if "role" not in config:
            try:
                role, expert = self.role_of(pid)
            except Exception as err:  # pylint: disable=broad-except  # one bad node must not end the run
                return f"has partition-id {pid} for which role_of raised {err!r}"
            if role not in (ANCHOR, NORMAL, TEST) or isinstance(expert, bool) or not isinstance(expert, int):
                return f"has partition-id {pid} for which role_of returned {(role, expert)!r}"
        else:  # reply_problem checked the declared role and an anchor's expert
            role = config["role"]
            expert = int(config["expert"]) if role == ANCHOR else -1
        if role == ANCHOR and not 0 <= expert < self.num_experts:
            return f"has partition-id {pid} for which role_of returned anchor of expert {expert} of {self.num_experts}"
        return _Client(node, None if pid is None else int(pid), role, expert)

    def sample(self, grid: Grid) -> tuple[list[_Client], list[_Client]]:
        """The round's anchors and normal clients, sampled (seeded, without replacement)
        among the connected ones."""
        anchors = self._sample(self._with_role(grid, ANCHOR), self.anchors_per_round)
        normals = self._sample(self._with_role(grid, NORMAL), self.normal_per_round)
        return anchors, normals

    def route(
        self, grid: Grid, clients: list[_Client], server_round: int, arrays: ArrayRecord, phase: str = "routing"
    ) -> Routing:
        """Routing phase: send the gate (``query.route``), receive mean gate scores, pick top-K.

        Parameters
        ----------
        grid : Grid
            The grid to reach the clients through.
        clients : list
            Clients to route.
        server_round : int
            Current round.
        arrays : ArrayRecord
            The global arrays (only the gate is sent).
        phase : str (default: "routing")
            The phase's name in the log.

        Returns
        -------
        Routing
            Node id -> its top-K experts and its scores, for the clients that replied
            with valid scores, and the exchange's byte count.
        """
        gate = select(arrays, moe_prefixes([]))
        queries = [self._message(c.node_id, gate, {"server-round": server_round}, ROUTE_QUERY) for c in clients]
        asked = {c.node_id for c in clients}
        exchange = self.exchange(grid, phase, queries)
        routing = Routing(exchange=exchange)
        for reply in exchange.replies:
            node = reply.metadata.src_node_id
            if node not in asked or node in routing.experts:
                log(WARNING, "%s: node %s sent a reply it was not asked for; ignored%s", phase, node, self._tag(node))
                continue
            problem = reply_problem(ROUTE_QUERY, reply.content, num_experts=self.total_experts)
            if problem:
                self._reject(node, phase, problem, f"it is left out of round {server_round}")
                continue
            scores = gate_scores(reply.content, self.total_experts)
            # Top-K among the anchor-owned experts; the generalist is sent to everyone.
            owned = scores[: self.num_experts] / max(scores[: self.num_experts].sum(), 1e-12)
            routing.experts[node] = adaptive_experts(owned, self.top_k, self.min_top_k, self.dispatch_mass)
            routing.scores[node] = scores.tolist()
        return routing

    def sent_experts(self, experts: list[int]) -> list[int]:
        """What a client given ``experts`` is sent: those and the generalist, if any."""
        return experts if self.generalist is None else [*experts, self.generalist]

    def _dispatch(self, clients_experts: Mapping[int, list[int]], arrays: ArrayRecord, config: dict, message_type: str):
        marked = {} if self.generalist is None else {"generalist-expert": self.generalist}
        sent = {node: self.sent_experts(experts) for node, experts in clients_experts.items()}
        return [
            self._message(
                node, select(arrays, moe_prefixes(experts)), {**config, **marked, "experts": experts}, message_type
            )
            for node, experts in sent.items()
        ]

    def configure_train(  # type: ignore[override]
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord | None = None,
        grid: Grid | None = None,
        *,
        anchors: list[_Client],
        routing: Routing,
    ) -> list[Message]:
        """Dispatch phase: the training messages (no exchange: routing came before).

        Parameters
        ----------
        server_round : int
            The current round.
        arrays : ArrayRecord
            The global gate and experts.
        config : ConfigRecord, optional
            Extra per-round configuration of every training message.
        grid : Grid, optional
            Unused (Flower's signature).
        anchors : list
            The sampled anchors.
        routing : Routing
            The routing phase's decision for the sampled normal clients.

        Returns
        -------
        list[Message]
            One ``train`` message per client: the gate plus its own expert (anchors)
            or its top-K experts (normal clients), and the per-round ``config``.
        """
        train_config = {**dict(config or {}), "server-round": server_round}
        return [
            *self._dispatch({c.node_id: [c.expert] for c in anchors}, arrays, {**train_config, "role": ANCHOR}, TRAIN),
            *self._dispatch(routing.experts, arrays, {**train_config, "role": NORMAL}, TRAIN),
        ]

    def aggregate_train(  # type: ignore[override]
        self,
        server_round: int,
        replies: Iterable[Message],
        *,
        sent: Mapping[int, ArrayRecord],
        arrays: ArrayRecord,
    ) -> tuple[ArrayRecord | None, MetricRecord]:
        """Aggregate phase: average the gate over all replies and each expert over its trainers.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            Training replies; errors and invalid updates are logged and left out.
        sent : Mapping[int, ArrayRecord]
            Node id -> the arrays it was sent (:func:`sent_arrays` of the messages):
            who may reply, and what a valid update must match.
        arrays : ArrayRecord
            The global arrays the round started from.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord]
            The new global arrays (``None`` if fewer than ``min_train_replies`` valid
            replies, or none, arrived, so the round is skipped) and the round's training
            metrics. Replies that break the protocol (``reply_problem``) are logged,
            naming the rule, and left out.
        """
        updates, losses, weights, anchor_acc = [], [], [], []
        rejected: list[str] = []
        answered: set[int] = set()
        # Sum updates, losses and accuracies in partition order, whatever the arrival order.
        for reply in sorted(replies, key=self._reply_order):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "train: node %s replied with an error: %s%s", node, reply.error.reason, self._tag(node))
                continue
            if node not in sent or node in answered:
                log(WARNING, "train: node %s sent an update it was not asked for; rejected%s", node, self._tag(node))
                continue
            answered.add(node)
            problem = reply_problem(TRAIN, reply.content, sent=sent[node])
            if problem:
                rejected.append(f"node {node}: {problem}")
                self._reject(node, "train", problem, f"its update is rejected, not aggregated in round {server_round}")
                continue
            metrics = reply.content[METRICS]
            update = reply.content[ARRAYS]
            n = metrics["num-examples"]
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
        }
        if len(updates) < max(1, self.min_train_replies):
            # No valid update (whatever min-train-replies) skips the round too: never a
            # "success" that aggregated nothing.
            log(
                WARNING,
                "round %d skipped: %d valid replies, fewer than %d (min-train-replies=%d)%s",
                server_round,
                len(updates),
                max(1, self.min_train_replies),
                self.min_train_replies,
                _rejections(rejected),
            )
            return None, MetricRecord(metrics)
        return aggregate_moe(arrays, updates), MetricRecord(metrics)

    def evaluation_clients(self, grid: Grid, server_round: int) -> list[_Client]:
        """The clients evaluated in ``server_round``: none unless it is an evaluation round
        (every ``eval_every`` rounds, every round of the last ``eval_last`` and the last
        one); then the unseen test clients, and the training clients too with
        ``eval_train_clients``."""
        if not evaluates(server_round, self.num_rounds, self.eval_every, self.eval_last):
            return []
        clients = self._with_role(grid, TEST)
        if self.eval_train_clients:
            clients += self._with_role(grid, ANCHOR) + self._with_role(grid, NORMAL)
        return clients

    def configure_evaluate(  # type: ignore[override]
        self,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord | None = None,
        grid: Grid | None = None,
        *,
        routing: Routing,
    ) -> list[Message]:
        """The evaluation messages of the routed clients (no exchange).

        Parameters
        ----------
        server_round : int
            The current round.
        arrays : ArrayRecord
            The global gate and experts.
        config : ConfigRecord, optional
            Extra per-round configuration of every evaluation message.
        grid : Grid, optional
            Unused (Flower's signature).
        routing : Routing
            The evaluation routing phase's decision.

        Returns
        -------
        list[Message]
            One ``evaluate`` message per routed client with the gate and its top-K experts.
        """
        eval_config = {**dict(config or {}), "server-round": server_round}
        return self._dispatch(routing.experts, arrays, eval_config, EVALUATE)

    def aggregate_evaluate(  # type: ignore[override]
        self, server_round: int, replies: Iterable[Message], *, evaluated: Collection[int]
    ) -> MetricRecord | None:
        """Average each metric over the test clients and over the training clients.

        Parameters
        ----------
        server_round : int
            The current round.
        replies : Iterable[Message]
            Evaluation replies.
        evaluated : Collection[int]
            The node ids that were sent an evaluation message (others are ignored).

        Returns
        -------
        MetricRecord | None
            ``test/<metric>`` (unseen clients, the zero-shot figures) and
            ``train/<metric>`` means over clients, or ``None`` if nothing arrived.
        """
        per_group: dict[str, dict[str, list[float]]] = {}
        rejected: list[str] = []
        answered: set[int] = set()
        # Means in partition order, whatever the arrival order (see _reply_order).
        for reply in sorted(replies, key=self._reply_order):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "evaluate: node %s replied with an error: %s%s", node, reply.error.reason, self._tag(node))
                continue
            client = self.clients.get(node)
            if client is None or node not in evaluated or node in answered:
                log(WARNING, "evaluate: ignored a reply of node %s it was not asked for%s", node, self._tag(node))
                continue
            answered.add(node)
            problem = reply_problem(EVALUATE, reply.content)
            if problem:
                rejected.append(f"node {node}: {problem}")
                self._reject(node, "evaluate", problem, f"its metrics are left out of round {server_round}")
                continue
            record = reply.content[METRICS]
            group = per_group.setdefault("test" if client.role == TEST else "train", {})
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    group.setdefault(key, []).append(float(value))
        if not per_group:
            if rejected:
                log(WARNING, "round %d: no evaluation metrics%s", server_round, _rejections(rejected))
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
        return MetricRecord(metrics)
