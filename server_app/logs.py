"""What the ServerApp's log shows: DDOME's one line per round, not Flower's metric dumps."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

# Messages of ``flwr.serverapp.strategy.Strategy.start`` that repeat, per round and at the
# end, what DDOME's round lines and metrics.jsonl already hold.
FLOWER_DUMPS = ("\t└──> Aggregated MetricRecord: %s", "\t└──> MetricRecord: %s", "Global evaluation", "[ROUND %s/%s]")


class FlowerDumps(logging.Filter):
    """Drops Flower's per-round metric dumps and its final ``Result`` listing."""

    def __init__(self) -> None:
        super().__init__()
        self.in_final_results = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Final results:":
            self.in_final_results = True
            return False
        if self.in_final_results and record.msg in ("\t%s", ""):
            return False
        self.in_final_results = False
        return record.msg not in FLOWER_DUMPS and record.msg != ""


@contextmanager
def quiet_flower_rounds(enabled: bool = True) -> Iterator[None]:
    """While active (and ``enabled``), Flower's metric dumps are left out of the log;
    they stay in ``metrics.jsonl``, and ``verbose=true`` shows them."""
    logger = logging.getLogger("flwr")
    dumps = FlowerDumps()
    if enabled:
        logger.addFilter(dumps)
    try:
        yield
    finally:
        logger.removeFilter(dumps)
