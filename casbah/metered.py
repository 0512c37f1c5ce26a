"""Metrics for the ActionCache and asset-index wrappers the loaders put around every backend.

Storage nodes have `MetricsStorage` (bytes, streams, digests); the other two
families only need calls and latency per config node and operation, so they
share this one meter.  A `NotFound` (or an empty answer to a lookup) is counted
as a miss, not an error: a dashboard can then tell a cold cache from a broken one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from prometheus_client import Counter, Histogram

from casbah.errors import NotFound

T = TypeVar("T")

CALLS = Counter("casbah_backend_calls_total", "ActionCache and asset-index operations",
                ["family", "node", "op", "outcome"])
LATENCY = Histogram(
    "casbah_backend_latency_seconds", "ActionCache and asset-index operation latency", ["family", "node", "op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
OUTCOMES = ("ok", "miss", "error")


class Meter:
    """Counts and times the calls of one wrapped backend (labels bound once, not per call)."""

    def __init__(self, family: str, node: str, ops: Iterable[str]) -> None:
        self.node = node
        ops = tuple(ops)
        self._calls = {(op, outcome): CALLS.labels(family=family, node=node, op=op, outcome=outcome)
                       for op in ops for outcome in OUTCOMES}
        self._latency = {op: LATENCY.labels(family=family, node=node, op=op) for op in ops}

    async def measure(self, op: str, call: Awaitable[T], empty_is_miss: bool = False) -> T:
        started = time.perf_counter()
        outcome = "error"
        try:
            result = await call
            outcome = "miss" if empty_is_miss and not result else "ok"
            return result
        except NotFound:
            outcome = "miss"
            raise
        finally:
            self._calls[op, outcome].inc()
            self._latency[op].observe(time.perf_counter() - started)
