"""Prometheus collectors: the interceptor's counts and the storage gauges, built at scrape time.

`GrpcCollector` reads the plain-int counters every live `Observability` keeps (see
`casbah.server.observability` for why they are not prometheus_client counters)
and sums them, so no label set is reported twice when a process runs several
servers.  Storage gauges (`casbah_storage_used_bytes`, `casbah_storage_objects`,
`casbah_storage_quota_bytes`, `casbah_storage_evictions_total{node}`) come from
`Storage.stats()`, which is async: the `/metrics` handler awaits
`refresh_storage_snapshot` before each scrape, and `StorageCollector` reports
that snapshot.  Both only read public state.  They register with the default
registry when this module is imported (by the server's HTTP side).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from casbah.server.observability import LATENCY_BUCKETS, Observability, live
from casbah.server.status_data import all_stats

_OK = grpc.StatusCode.OK


class StorageCollector:
    """Reports the last storage snapshot: gauges for size/objects/quota, a counter for evictions."""

    def __init__(self) -> None:
        #: node label -> its stats, as of the last `refresh_storage_snapshot`.
        self.snapshot: dict[str, dict[str, int]] = {}

    def describe(self) -> list:
        return []  # no collect() at registration: the snapshot is filled later

    def collect(self) -> Iterator:
        used = GaugeMetricFamily("casbah_storage_used_bytes", "Bytes stored by a storage node", labels=["node"])
        objects = GaugeMetricFamily("casbah_storage_objects", "Blobs stored by a storage node", labels=["node"])
        quota = GaugeMetricFamily("casbah_storage_quota_bytes", "Size limit of a storage node (0 = none)",
                                  labels=["node"])
        evictions = CounterMetricFamily("casbah_storage_evictions", "Blobs evicted to stay under the quota",
                                        labels=["node"])
        for node, stats in sorted(self.snapshot.items()):
            if "bytes" in stats:
                used.add_metric([node], stats["bytes"])
            if "objects" in stats:
                objects.add_metric([node], stats["objects"])
            if "quota_bytes" in stats:
                quota.add_metric([node], stats["quota_bytes"] or 0)
            if "evictions" in stats:
                evictions.add_metric([node], stats["evictions"])
        yield from (used, objects, quota, evictions)


async def refresh_storage_snapshot(obs: Observability) -> dict[str, dict[str, int]]:
    """Call every node's `stats()` (concurrently, bounded) for the storage gauges."""
    snapshot = {node.node_label: stats for node, stats in await all_stats(obs.instances) if stats}
    STORAGE_COLLECTOR.snapshot = snapshot
    return snapshot


class GrpcCollector:
    """Exports the interceptor's counts as Prometheus families, summed over every live server."""

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        requests: dict[tuple, int] = {}
        latency: dict[tuple, list] = {}
        received: dict[tuple, int] = {}
        sent: dict[tuple, int] = {}
        lookups: dict[tuple, int] = {}
        for obs in live():
            for method in obs.methods():
                for instance, series in list(method.series.items()):
                    labels = (method.service, method.name, instance)
                    for code, count in ((_OK, series.ok), *list(series.errors.items())):
                        if count:
                            coded = (method.service, method.name, code.name, instance)
                            requests[coded] = requests.get(coded, 0) + count
                    counts = latency.setdefault(labels, [[0] * len(series.latency), 0.0])
                    for i, n in enumerate(series.latency):
                        counts[0][i] += n
                    counts[1] += series.latency_sum
                    if method.in_bytes:
                        received[labels] = received.get(labels, 0) + series.received
                    if method.out_bytes:
                        sent[labels] = sent.get(labels, 0) + series.sent
            for (instance, cache), window in obs.hit_windows():
                for result, count in (("hit", window.total_a), ("miss", window.total_b)):
                    key = (cache, instance, result)
                    lookups[key] = lookups.get(key, 0) + count
        yield _counter("casbah_grpc_requests", "gRPC calls handled, by final status code",
                       ["service", "method", "code", "instance"], requests)
        histogram = HistogramMetricFamily(
            "casbah_grpc_request_duration_seconds", "gRPC call duration, from the handler's start to its last message",
            labels=["service", "method", "instance"])
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for key, (counts, total) in sorted(latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            histogram.add_metric(key, buckets, total)
        yield histogram
        for name, doc, values in (
            ("casbah_grpc_received_bytes", "Blob payload bytes received (ByteStream.Write, BatchUpdateBlobs)",
             received),
            ("casbah_grpc_sent_bytes", "Blob payload bytes sent (ByteStream.Read, BatchReadBlobs)", sent),
        ):
            yield _counter(name, doc, ["service", "method", "instance"], values)
        yield _counter("casbah_cache_lookups",
                       "Cache lookups: digests in FindMissingBlobs, ActionCache gets, asset fetches",
                       ["cache", "instance", "result"], lookups)


def _counter(name: str, doc: str, labels: list[str], values: dict[tuple, int]) -> CounterMetricFamily:
    """One counter family from per-label-tuple totals, in a stable order."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, count in sorted(values.items()):
        family.add_metric(key, count)
    return family


STORAGE_COLLECTOR = StorageCollector()
REGISTRY.register(STORAGE_COLLECTOR)
REGISTRY.register(GrpcCollector())
