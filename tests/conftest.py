"""Shared test helpers: an in-process Grid that hands messages to Python callables."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import pytest
from flwr.app import Message
from flwr.common.logger import FLOWER_LOGGER
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


@pytest.fixture
def warnings_log():
    """The WARNING messages logged to Flower's logger (the strategy logs there)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    FLOWER_LOGGER.addHandler(handler)
    yield lambda: [r.getMessage() for r in records]
    FLOWER_LOGGER.removeHandler(handler)


@pytest.fixture
def digits_benchmark(tmp_path):
    """Builds ``(cfg, dataset, common)`` of the benchmark on ``configs/digits-tiny.yaml``
    (seed 0) with extra run-config items; the common expert is cached in ``cache_dir``."""
    from benchmarks.compare import parse_args, resolve_config
    from server_app.app import build_common_expert

    def build(*run_config: str, cache_dir=tmp_path):
        preset = ["--config-file", "configs/digits-tiny.yaml"]
        cfg = resolve_config(parse_args([*preset, "--run-config", *run_config, f"cache-dir={cache_dir}"]), 0)
        dataset, common, _ = build_common_expert(cfg)
        return cfg, dataset, common

    return build


@pytest.fixture(scope="session")
def tiny_run_config():
    """Builds a run config of ``configs/digits-tiny.yaml`` writing into a folder, with the
    common expert cached beside it, where every test finds it: ``build(folder, **overrides)``."""
    from server_app.config import DEFAULTS

    def build(folder, **overrides) -> dict:
        return {
            **DEFAULTS,
            "config-file": "configs/digits-tiny.yaml",
            "output-dir": str(folder / "out"),
            "cache-dir": str(folder.parent / "ddome-test-cache"),
            **overrides,
        }

    return build
