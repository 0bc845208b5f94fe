"""A Grid that runs ClientApps in this process, one node per partition.

For tests and benchmarks that need DDOME's exact message flow without a SuperLink or
Ray workers. It implements the part of ``flwr.serverapp.Grid`` that strategies use.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity


def ensure_task_identity() -> None:
    """Messages can only be built inside a Flower runtime unless these ids are set."""
    for attr in ("task_id", "run_id", "node_id"):
        if getattr(TaskIdentity, f"_{attr}") is None:
            setattr(TaskIdentity, attr, 1)


class InProcessGrid:
    """Nodes ``1000 + partition_id`` each running ``client_app`` with its own state."""

    def __init__(self, client_app: ClientApp, num_nodes: int, node_config: dict | None = None) -> None:
        ensure_task_identity()
        self.client_app = client_app
        self.contexts = {
            1000 + pid: Context(
                run_id=1,
                node_id=1000 + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes, **(node_config or {})},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }

    def get_node_ids(self) -> Iterable[int]:
        """Ids of all nodes."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Run each message through its node's ClientApp and return the replies."""
        return [self.client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
