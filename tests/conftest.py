"""Shared test helpers: an in-process Grid that hands messages to Python callables."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity


@pytest.fixture(autouse=True)
def task_identity():
    """Messages can only be built inside a Flower runtime unless these ids are set."""
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield


class FakeGrid:
    """A Grid whose nodes are Python callables ``handler(message) -> reply``.

    Records every message sent so tests can inspect what each node received.
    """

    def __init__(self, handlers: dict[int, Callable[[Message], Message]]) -> None:
        self.handlers = handlers
        self.sent: list[Message] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.handlers)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            replies.append(self.handlers[message.metadata.dst_node_id](message))
        return replies


@pytest.fixture
def fake_grid_class():
    return FakeGrid
