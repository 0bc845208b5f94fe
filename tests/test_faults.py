"""A federation that loses nodes: the run goes on without them, and a node that comes back
(restarted, with nothing of the run kept) is found again and sent the common expert."""

import json
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, RecordDict
from flwr.server.superlink.linkstate.utils import create_message_error_unavailable_res_message

from client_app.app import app as client_app
from ddome_strategy.protocol import CLIENT_CONFIG, COMMON_EXPERT, ROLE_QUERY
from server_app.app import run_ddome
from server_app.inprocess import InProcessGrid

NODES = 13  # configs/digits-tiny.yaml: 10 training clients (0-4 anchors) + 3 test clients
LOST = 1003  # anchor of expert 3


class LosingGrid(InProcessGrid):
    """Node ``LOST`` goes away during round ``lost_in`` and is back, restarted, from round ``back_in``.

    While it is away its messages are answered the way Flower's SuperLink answers for a
    node it lost: an error reply from the SuperLink itself (node id 1) to the message's id.
    """

    def __init__(self, lost_in: int, back_in: int) -> None:
        super().__init__(client_app, NODES)
        self.lost_in, self.back_in = lost_in, back_in
        self.round = 0
        self.restarted = False
        self.received: dict[int, list] = {}

    def away(self) -> bool:
        return self.lost_in <= self.round < self.back_in

    def get_node_ids(self):
        return [n for n in self.contexts if n != LOST or not self.away()]

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid4().hex  # as Flower's grids do
            config = message.content.config_records.get("config", {})
            self.round = max(self.round, int(config.get("server-round", 0)))
            node = message.metadata.dst_node_id
            if node == LOST and self.round >= self.back_in and not self.restarted:
                # The node's process restarted: nothing of the run survived.
                self.contexts[LOST] = Context(1, LOST, self.contexts[LOST].node_config, RecordDict(), {})
                self.restarted = True
            if node == LOST and self.away():
                replies.append(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
                continue
            if node == LOST and message.metadata.message_type != ROLE_QUERY:
                self.received.setdefault(self.round, []).append(message)
            replies.append(self.client_app(message, self.contexts[node]))
        return replies


def test_a_lost_node_costs_only_its_contribution_and_is_served_again_when_back(tiny_run_config, tmp_path, warnings_log):
    grid = LosingGrid(lost_in=2, back_in=5)
    # min-nodes is every node (13) and the timeout short: only the start waits for all of them.
    cfg = tiny_run_config(tmp_path, **{"num-server-rounds": 8, "round-timeout": 5.0, "eval-every": 4})
    summary = run_ddome(grid, cfg)
    rows = [json.loads(line) for line in (Path(summary["output"]) / "metrics.jsonl").read_text().splitlines()]
    trained = {r["round"]: r["num-replies"] for r in rows if r["stage"] == "train"}
    assert sorted(trained) == list(range(1, 9))  # no round was lost, and the run did not end
    # Only the lost anchor was missing, while it was away (its rounds start with the round
    # after its return: a round samples among the nodes connected when it starts).
    assert [trained[r] for r in range(2, 6)] == [trained[1] - 1] * 4 and trained[6] == trained[1]
    log = "\n".join(warnings_log())
    # Flower's error reply comes from the SuperLink (node 1): the log names the lost node.
    assert f"node {LOST} replied with an error" in log and "node 1 replied" not in log
    assert "[anchor of expert 3, partition-id 3]" in log
    # Back after a restart, its first message brings the set-up again, and it trains.
    first_back = grid.received[6][0]
    assert CLIENT_CONFIG in first_back.content and COMMON_EXPERT in first_back.content
    assert all(COMMON_EXPERT not in m.content for m in grid.received[6][1:] + grid.received[7])
    assert "No common-expert embeddings" not in log and "no common-expert embeddings" not in log
    assert summary["zero-shot-acc"] > 0.5
