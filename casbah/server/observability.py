"""Per-RPC metrics, cache hit rates, recent requests, health checking and reflection.

One `grpc.aio.ServerInterceptor` sees every call, so services stay free of
bookkeeping.  For each call it records, in Prometheus:

- `casbah_grpc_requests_total{service, method, code, instance}`
- `casbah_grpc_request_duration_seconds{service, method, instance}` (histogram)
- `casbah_grpc_received_bytes_total` / `casbah_grpc_sent_bytes_total{service, method, instance}`:
  blob payload bytes of ByteStream Read/Write and Batch{Read,Update}Blobs
- `casbah_cache_lookups_total{cache, instance, result}`: `cas` counts digests asked by
  FindMissingBlobs (hit = present), `action_cache` counts GetActionResult (OK = hit,
  NOT_FOUND = miss), `asset` counts FetchBlob/FetchDirectory (OK with an OK status = hit)
  and BuildStream 1's GetReference (OK = hit)

and, for the status page, per-minute hit/miss counts of the last hour and a ring
of recent requests with the client's `RequestMetadata` (tool, invocation id,
action id).  The same parsed metadata goes into `casbah.logs.REQUEST_CONTEXT`, so
every log line emitted while handling the call names the build that caused it.

The interceptor runs on every FindMissingBlobs of every build, so the hot path is
kept to a few dictionary lookups and integer additions (about 4 µs a call; see
README's Observability section).  Counting goes to plain ints on a per-(method,
instance) `_Series`, created on first use and kept, and `GrpcCollector` turns
them into Prometheus families at scrape time: prometheus_client's own
`Counter.inc`/`Histogram.observe` take a lock and validate on every call, which
cost about 6 µs per RPC here for nothing (the event loop is single-threaded).
The wrapped handler of a method is built once, and the parsed metadata is cached
by its raw bytes (a build sends the same header bytes for all calls of an action).

Storage gauges (`casbah_storage_used_bytes`, `casbah_storage_objects`,
`casbah_storage_quota_bytes`, `casbah_storage_evictions_total{node}`) are not
counted here: `stats()` is async, so the HTTP handler refreshes a snapshot before
each scrape (`refresh_storage_snapshot`) and a collector reports it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from casbah.errors import code_from_int
from casbah.logs import REQUEST_CONTEXT, REQUEST_METHOD, RequestContext
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.server.resource_names import RESERVED
from casbah.storage.base import Storage

log = logging.getLogger("casbah.observability")

METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"

#: Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)

#: Every gRPC service casbah registers (health and reflection list these).
SERVED_SERVICES = (
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Fetch"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Push"].full_name,
    bst_pb2.DESCRIPTOR.services_by_name["ReferenceStorage"].full_name,
)

CACHES = ("cas", "action_cache", "asset")
#: Label for instance names the server does not serve: a client could otherwise
#: create one time series per name it invents.
UNKNOWN_INSTANCE = "(unknown)"
WINDOW_MINUTES = 60
RECENT_REQUESTS = 500
MAX_INVOCATIONS = 1000
_METADATA_CACHE = 4096
_MISSING: Any = object()
#: Seconds one storage node's stats() may take before a scrape reports it without them.
STATS_TIMEOUT = 5.0

_OK = grpc.StatusCode.OK
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN


class MinuteWindow:
    """Two counters per minute over the last hour, in a ring of 60 slots.

    A slot is reset when a new minute first lands in it, so stale minutes cost
    nothing until they are overwritten, and reading skips slots older than an hour.
    """

    __slots__ = ("a", "b", "minutes", "total_a", "total_b")

    def __init__(self) -> None:
        self.minutes = [-1] * WINDOW_MINUTES
        self.a = [0] * WINDOW_MINUTES
        self.b = [0] * WINDOW_MINUTES
        #: Since start, for the Prometheus counters.
        self.total_a = 0
        self.total_b = 0

    def add(self, minute: int, a: int, b: int) -> None:
        """Count into `minute` (epoch seconds // 60)."""
        self.total_a += a
        self.total_b += b
        slot = minute % WINDOW_MINUTES
        if self.minutes[slot] != minute:
            self.minutes[slot] = minute
            self.a[slot] = 0
            self.b[slot] = 0
        self.a[slot] += a
        self.b[slot] += b

    def series(self, now: float) -> list[tuple[int, int, int]]:
        """(minute start as epoch seconds, a, b) for each of the last 60 minutes, oldest first."""
        current = int(now) // 60
        out = []
        for minute in range(current - WINDOW_MINUTES + 1, current + 1):
            slot = minute % WINDOW_MINUTES
            if self.minutes[slot] == minute:
                out.append((minute * 60, self.a[slot], self.b[slot]))
            else:
                out.append((minute * 60, 0, 0))
        return out


class _Series:
    """Everything counted for one (method, instance): plain ints, read by `GrpcCollector`."""

    __slots__ = ("errors", "instance", "latency", "latency_sum", "method", "ok", "received", "requests", "sent",
                 "window")

    def __init__(self, method: _Method, instance: str, obs: Observability) -> None:
        self.method = method
        self.instance = instance
        self.ok = 0
        #: Calls that ended with another code (rare: a dict is fine).
        self.errors: dict[grpc.StatusCode, int] = {}
        #: Per-bucket (not cumulative) counts; the last slot is +Inf.
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.received = 0
        self.sent = 0
        self.requests = obs.request_window(instance)
        self.window = obs.hit_window(instance, method.cache) if method.cache else None


def _instance_of_resource(name: str) -> str:
    """The instance part of a ByteStream resource name (everything before the first
    reserved keyword, as `casbah.server.resource_names` parses it)."""
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part in RESERVED:
            return "/".join(parts[:i])
    return UNKNOWN_INSTANCE


def _instance_field(request: Any) -> str:
    return request.instance_name


def _read_resource(request: Any) -> str:
    return _instance_of_resource(request.resource_name)


def _no_instance(request: Any) -> str:
    return ""


def _batch_update_bytes(request: Any) -> int:
    return sum(len(r.data) for r in request.requests)


def _batch_read_bytes(response: Any) -> int:
    return sum(len(r.data) for r in response.responses)


def _read_bytes(response: Any) -> int:
    return len(response.data)


def _fmb_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is not _OK:
        return 0, 0
    missing = len(response.missing_blob_digests)
    return len(request.blob_digests) - missing, missing


def _found_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is _OK:
        return 1, 0
    return (0, 1) if code is _NOT_FOUND else (0, 0)


def _fetch_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is _OK:
        return (1, 0) if response.status.code == 0 else (0, 1)
    return (0, 1) if code is _NOT_FOUND else (0, 0)


#: Per full method name: (cache, hit/miss function) for the calls that are cache lookups.
_CACHE_METHODS = {
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs": ("cas", _fmb_hits),
    "/build.bazel.remote.execution.v2.ActionCache/GetActionResult": ("action_cache", _found_hits),
    "/build.bazel.remote.asset.v1.Fetch/FetchBlob": ("asset", _fetch_hits),
    "/build.bazel.remote.asset.v1.Fetch/FetchDirectory": ("asset", _fetch_hits),
    "/buildstream.v2.ReferenceStorage/GetReference": ("asset", _found_hits),
}
_IN_BYTES = {
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs": _batch_update_bytes,
    "/google.bytestream.ByteStream/Write": True,  # counted per message by _CountingRequests
}
_OUT_BYTES = {
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs": _batch_read_bytes,
    "/google.bytestream.ByteStream/Read": _read_bytes,
}
_RESOURCE_NAMED = {
    "/google.bytestream.ByteStream/Read": _read_resource,
    "/google.bytestream.ByteStream/QueryWriteStatus": _read_resource,
}


class _Method:
    """What the interceptor knows about one gRPC method, computed on its first call."""

    __slots__ = ("cache", "full", "hits", "in_bytes", "instance_of", "name", "out_bytes", "series", "service", "short")

    def __init__(self, full: str, request_type: type | None) -> None:
        self.full = full
        service, _, self.name = full.lstrip("/").rpartition("/")
        self.service = service
        self.short = f"{service.rpartition('.')[2]}.{self.name}"
        self.cache, self.hits = _CACHE_METHODS.get(full, (None, None))
        self.in_bytes = _IN_BYTES.get(full)
        self.out_bytes = _OUT_BYTES.get(full)
        if full in _RESOURCE_NAMED:
            self.instance_of = _RESOURCE_NAMED[full]
        elif request_type is not None and "instance_name" in request_type.DESCRIPTOR.fields_by_name:
            self.instance_of = _instance_field
        else:
            self.instance_of = _no_instance
        self.series: dict[str, _Series] = {}


def _request_type(handler: grpc.RpcMethodHandler) -> type | None:
    """The request message class, recovered from the generated deserializer (`Msg.FromString`)."""
    owner = getattr(handler.request_deserializer, "__self__", None)
    return owner if isinstance(owner, type) and hasattr(owner, "DESCRIPTOR") else None


def _parse_metadata(raw: bytes) -> RequestContext | None:
    try:
        md = re_pb2.RequestMetadata.FromString(raw)
    except Exception:  # a malformed header must not fail the call it rides on
        return None
    return RequestContext(md.tool_details.tool_name, md.tool_details.tool_version, md.tool_invocation_id,
                          md.action_id, md.correlated_invocations_id, md.target_id, md.action_mnemonic)


class _CountingRequests:
    """Wraps a client stream to count payload bytes and remember the first resource name.

    A class, not an async generator: the servicer calls `anext(aiter(it))` again
    for every message, and a generator would also outlive an abandoned stream.
    """

    __slots__ = ("_it", "nbytes", "resource")

    def __init__(self, requests: Any) -> None:
        self._it = aiter(requests)
        self.nbytes = 0
        self.resource: str | None = None

    def __aiter__(self) -> _CountingRequests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._it)
        self.nbytes += len(request.data)
        if self.resource is None:
            self.resource = request.resource_name
        return request


class Observability:
    """The per-server state the interceptor fills and the status page reads."""

    def __init__(self, instances: Iterable[Any], *, listen: Iterable[str] = (), version: str = "") -> None:
        self.instances = list(instances)
        #: Served instance names -> themselves; "" always (methods without an instance).
        self._labels = {inst.name: inst.name for inst in self.instances}
        self._labels[""] = ""
        self.listen = list(listen)
        self.version = version
        self.started = time.time()
        self.shutting_down = False
        self._hit_windows: dict[tuple[str, str], MinuteWindow] = {}
        self._request_windows: dict[str, MinuteWindow] = {}
        #: (time, method, code, instance, seconds, RequestContext | None), newest last.
        self.recent: deque[tuple] = deque(maxlen=RECENT_REQUESTS)
        #: invocation id -> [tool, version, first seen, last seen, requests, errors]
        self.invocations: dict[str, list] = {}
        self._metadata: dict[bytes, RequestContext | None] = {}
        self._methods: dict[str, tuple[Any, _Method, grpc.RpcMethodHandler]] = {}
        self.health: Any = None
        self.http: Any = None  # the status page's aiohttp runner, when serving
        self.interceptor = MetricsInterceptor(self)
        _LIVE.add(self)
        for inst in self.instances:
            for cache in CACHES:
                self.hit_window(inst.name, cache)
            self.request_window(inst.name)

    # -- windows ---------------------------------------------------------------------

    def hit_window(self, instance: str, cache: str) -> MinuteWindow:
        window = self._hit_windows.get((instance, cache))
        if window is None:
            window = self._hit_windows[(instance, cache)] = MinuteWindow()
        return window

    def request_window(self, instance: str) -> MinuteWindow:
        """Calls (a) and failed calls (b) per minute for one instance."""
        window = self._request_windows.get(instance)
        if window is None:
            window = self._request_windows[instance] = MinuteWindow()
        return window

    # -- the per-call path -----------------------------------------------------------

    def request_context(self, metadata: Any) -> RequestContext | None:
        """The parsed RequestMetadata of a call, cached by the header's bytes."""
        if not metadata:
            return None
        value = None
        for key, item in metadata:
            if key == METADATA_KEY:
                value = item
                break
        if value is None:
            return None
        ctx = self._metadata.get(value, _MISSING)
        if ctx is not _MISSING:
            return ctx
        if len(self._metadata) >= _METADATA_CACHE:
            self._metadata.clear()
        ctx = self._metadata[value] = _parse_metadata(value)
        return ctx

    def method_for(self, full: str, handler: grpc.RpcMethodHandler) -> tuple[_Method, grpc.RpcMethodHandler]:
        """The wrapped handler for `handler`, built on the first call of a method."""
        entry = self._methods.get(full)
        if entry is not None and entry[0] is handler:
            return entry[1], entry[2]
        method = _Method(full, _request_type(handler))
        wrapped = _wrap(handler, method, self)
        self._methods[full] = (handler, method, wrapped)
        return method, wrapped

    def series(self, method: _Method, instance: str) -> _Series:
        series = method.series.get(instance)
        if series is None:
            series = method.series[instance] = _Series(method, instance, self)
        return series

    def record(self, method: _Method, instance: str, code: grpc.StatusCode, started: float,
               request: Any, response: Any, nbytes_in: int, nbytes_out: int) -> None:
        """Everything the interceptor records about one finished call."""
        elapsed = time.perf_counter() - started
        series = method.series.get(instance) or self.series(method, instance)
        if code is _OK:
            series.ok += 1
            failed = False
        else:
            series.errors[code] = series.errors.get(code, 0) + 1
            # A cache miss answered NOT_FOUND is the expected answer, not a failure.
            failed = not (code is _NOT_FOUND and method.cache is not None)
        series.latency[bisect_left(LATENCY_BUCKETS, elapsed)] += 1
        series.latency_sum += elapsed
        series.received += nbytes_in
        series.sent += nbytes_out
        now = time.time()
        minute = int(now) // 60
        series.requests.add(minute, 1, failed)
        if series.window is not None:
            hits, misses = method.hits(request, response, code)
            series.window.add(minute, hits, misses)
        ctx = REQUEST_CONTEXT.get()
        self.recent.append((now, method, code, instance, elapsed, ctx))
        if ctx is not None and ctx.invocation_id:
            entry = self.invocations.get(ctx.invocation_id)
            if entry is None:
                if len(self.invocations) >= MAX_INVOCATIONS:
                    del self.invocations[next(iter(self.invocations))]
                entry = self.invocations[ctx.invocation_id] = [ctx.tool_name, ctx.tool_version, now, now, 0, 0]
            entry[3] = now
            entry[4] += 1
            entry[5] += failed

    # -- health ----------------------------------------------------------------------

    async def add_health_and_reflection(self, server: grpc.aio.Server, services: Iterable[str] = SERVED_SERVICES
                                        ) -> None:
        """Register grpc.health.v1 (SERVING for "" and each service) and server reflection.

        Health lets load balancers and Kubernetes probes ask over gRPC instead of
        guessing from an open port; reflection lets grpcurl and grpc_cli call the
        server without the .proto files at hand.
        """
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

    async def enter_shutdown(self) -> None:
        """Health turns NOT_SERVING before the drain starts, so balancers stop sending work."""
        self.shutting_down = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()

    async def start_http(self, address: str, worker: int | None = None) -> str:
        """Serve /metrics and the status page; returns the URL (port 0 resolved)."""
        from casbah.server.status_page import start_status_server

        self.http, url = await start_status_server(self, address, worker)
        return url

    async def close(self) -> None:
        if self.http is not None:
            runner, self.http = self.http, None
            await runner.cleanup()

    # -- storage ---------------------------------------------------------------------

    def storage_nodes(self) -> list[Storage]:
        """Every storage node of every instance (CAS and ActionCache), each once."""
        seen: dict[int, Storage] = {}

        def visit(node: Storage) -> None:
            if id(node) in seen:
                return
            seen[id(node)] = node
            for child in node.children():
                visit(child)

        for inst in self.instances:
            visit(inst.cas)
            ac_storage = getattr(inst.action_cache, "storage", None)
            if isinstance(ac_storage, Storage):
                visit(ac_storage)
        return list(seen.values())

    async def refresh_storage_snapshot(self) -> dict[str, dict[str, int]]:
        """Call every node's `stats()` (concurrently, bounded) for the storage gauges."""
        nodes = self.storage_nodes()
        results = await asyncio.gather(*(node_stats(n) for n in nodes))
        snapshot = {node_label(n): stats for n, stats in zip(nodes, results, strict=True) if stats}
        STORAGE_COLLECTOR.snapshot = snapshot
        return snapshot


def node_label(node: Storage) -> str:
    """The `node` label storage metrics use: the config path, as `MetricsStorage` names it."""
    return getattr(node, "node_path", None) or node.name


async def node_stats(node: Storage) -> dict[str, int]:
    """A node's stats, or {} when it fails or is too slow (a scrape must still answer)."""
    try:
        return dict(await asyncio.wait_for(node.stats(), STATS_TIMEOUT))
    except Exception as exc:
        log.warning("stats() of storage %s failed: %s", node_label(node), exc)
        return {}


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Looks up the method's wrapped handler and sets the request context for the call.

    grpc.aio runs the interceptors and then the handler in one contextvars
    Context per call, so the context variables set here are seen by the handler
    and by everything it logs, and never by another call.
    """

    def __init__(self, obs: Observability) -> None:
        self._obs = obs

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        REQUEST_METHOD.set(full)
        ctx = self._obs.request_context(handler_call_details.invocation_metadata)
        if ctx is not None:
            REQUEST_CONTEXT.set(ctx)
        entry = self._obs._methods.get(full)
        if entry is not None and entry[0] is handler:
            return entry[2]
        return self._obs.method_for(full, handler)[1]


def _code_of(context: Any, default: grpc.StatusCode = _OK) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    return code_from_int(code)  # an int, from set_code(int) in foreign handlers


def _wrap(handler: grpc.RpcMethodHandler, method: _Method, obs: Observability) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behaviour times the call and records it."""
    instance_of = method.instance_of
    labels = obs._labels
    record = obs.record
    in_bytes = method.in_bytes
    out_bytes = method.out_bytes
    perf_counter = time.perf_counter

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            started = perf_counter()
            code = _OK
            response = None
            try:
                response = await inner(request, context)
                code = _code_of(context)
                return response
            except grpc.aio.AbortError:
                code = _code_of(context, _UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except Exception:
                code = _UNKNOWN
                raise
            finally:
                record(method, labels.get(instance_of(request), UNKNOWN_INSTANCE), code, started, request, response,
                       in_bytes(request) if in_bytes is not None and code is _OK else 0,
                       out_bytes(response) if out_bytes is not None and code is _OK else 0)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)

    if handler.stream_unary is not None:
        inner = handler.stream_unary

        async def stream_unary(request_iterator, context):
            started = perf_counter()
            code = _OK
            counted = _CountingRequests(request_iterator)
            try:
                response = await inner(counted, context)
                code = _code_of(context)
                return response
            except grpc.aio.AbortError:
                code = _code_of(context, _UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except Exception:
                code = _UNKNOWN
                raise
            finally:
                instance = labels.get(_instance_of_resource(counted.resource), UNKNOWN_INSTANCE) \
                    if counted.resource is not None else UNKNOWN_INSTANCE
                record(method, instance, code, started, None, None, counted.nbytes, 0)

        return grpc.stream_unary_rpc_method_handler(stream_unary, handler.request_deserializer,
                                                    handler.response_serializer)

    streaming = handler.unary_stream or handler.stream_stream
    client_streams = handler.unary_stream is None

    # grpc.aio accepts both: an async generator, or a coroutine writing with
    # context.write() (grpc_health's Watch); the wrapper must be of the same kind.
    if not inspect.iscoroutinefunction(streaming):

        async def stream_out(request, context) -> AsyncIterator:
            started = perf_counter()
            code = _OK
            sent = 0
            try:
                async for response in streaming(request, context):
                    if out_bytes is not None:
                        sent += out_bytes(response)
                    yield response
                code = _code_of(context)
            except grpc.aio.AbortError:
                code = _code_of(context, _UNKNOWN)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code = _CANCELLED
                raise
            except Exception:
                code = _UNKNOWN
                raise
            finally:
                instance = "" if client_streams else labels.get(instance_of(request), UNKNOWN_INSTANCE)
                record(method, instance, code, started, None, None, 0, sent)

        behaviour = stream_out
    else:

        async def behaviour(request, context):
            started = perf_counter()
            code = _OK
            try:
                result = await streaming(request, context)
                code = _code_of(context)
                return result
            except grpc.aio.AbortError:
                code = _code_of(context, _UNKNOWN)
                raise
            except asyncio.CancelledError:
                code = _CANCELLED
                raise
            except Exception:
                code = _UNKNOWN
                raise
            finally:
                instance = "" if client_streams else labels.get(instance_of(request), UNKNOWN_INSTANCE)
                record(method, instance, code, started, None, None, 0, 0)

    factory = grpc.stream_stream_rpc_method_handler if client_streams else grpc.unary_stream_rpc_method_handler
    return factory(behaviour, handler.request_deserializer, handler.response_serializer)


class _StorageCollector:
    """Reports the last storage snapshot: gauges for size/objects/quota, a counter for evictions."""

    def __init__(self) -> None:
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


class GrpcCollector:
    """Exports the interceptor's counts as Prometheus families at scrape time.

    Sums over every live `Observability` in the process (one per server; tests
    and benchmarks may run several), so no label set is ever reported twice.
    """

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        requests: dict[tuple, int] = {}
        latency: dict[tuple, list] = {}
        received: dict[tuple, int] = {}
        sent: dict[tuple, int] = {}
        lookups: dict[tuple, int] = {}
        for obs in list(_LIVE):
            for _, method, _ in list(obs._methods.values()):
                for instance, series in list(method.series.items()):
                    labels = (method.service, method.name, instance)
                    for code, count in ((_OK, series.ok), *list(series.errors.items())):
                        if count:
                            key = (method.service, method.name, code.name, instance)
                            requests[key] = requests.get(key, 0) + count
                    counts = latency.setdefault(labels, [[0] * len(series.latency), 0.0])
                    for i, n in enumerate(series.latency):
                        counts[0][i] += n
                    counts[1] += series.latency_sum
                    if method.in_bytes:
                        received[labels] = received.get(labels, 0) + series.received
                    if method.out_bytes:
                        sent[labels] = sent.get(labels, 0) + series.sent
            for (instance, cache), window in list(obs._hit_windows.items()):
                for result, count in (("hit", window.total_a), ("miss", window.total_b)):
                    key = (cache, instance, result)
                    lookups[key] = lookups.get(key, 0) + count
        family = CounterMetricFamily("casbah_grpc_requests", "gRPC calls handled, by final status code",
                                     labels=["service", "method", "code", "instance"])
        for key, count in sorted(requests.items()):
            family.add_metric(key, count)
        yield family
        family = HistogramMetricFamily(
            "casbah_grpc_request_duration_seconds", "gRPC call duration, from the handler's start to its last message",
            labels=["service", "method", "instance"])
        bounds = [*map(floatToGoString, LATENCY_BUCKETS), "+Inf"]
        for key, (counts, total) in sorted(latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(bounds, counts, strict=True):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric(key, buckets, total)
        yield family
        for name, doc, values in (
            ("casbah_grpc_received_bytes", "Blob payload bytes received (ByteStream.Write, BatchUpdateBlobs)",
             received),
            ("casbah_grpc_sent_bytes", "Blob payload bytes sent (ByteStream.Read, BatchReadBlobs)", sent),
        ):
            family = CounterMetricFamily(name, doc, labels=["service", "method", "instance"])
            for key, count in sorted(values.items()):
                family.add_metric(key, count)
            yield family
        family = CounterMetricFamily(
            "casbah_cache_lookups", "Cache lookups: digests in FindMissingBlobs, ActionCache gets, asset fetches",
            labels=["cache", "instance", "result"])
        for key, count in sorted(lookups.items()):
            family.add_metric(key, count)
        yield family


_LIVE: weakref.WeakSet[Observability] = weakref.WeakSet()
STORAGE_COLLECTOR = _StorageCollector()
REGISTRY.register(STORAGE_COLLECTOR)
REGISTRY.register(GrpcCollector())


def recent_requests(obs: Observability, limit: int = 100) -> list[dict[str, Any]]:
    """The newest calls first, as JSON-ready dicts (for /api/requests)."""
    out = []
    for when, method, code, instance, elapsed, ctx in reversed(list(obs.recent)[-limit:]):
        item: dict[str, Any] = {"time": when, "method": method.short, "service": method.service,
                                "code": code.name, "instance": instance, "ms": round(elapsed * 1000, 3)}
        if ctx is not None:
            item.update(tool=ctx.tool_name, tool_version=ctx.tool_version, invocation_id=ctx.invocation_id,
                        action_id=ctx.action_id, target_id=ctx.target_id, mnemonic=ctx.action_mnemonic)
        out.append(item)
    return out


def invocation_summaries(obs: Observability, limit: int = 50) -> list[dict[str, Any]]:
    """Builds seen recently, most recently active first."""
    rows = sorted(obs.invocations.items(), key=lambda kv: kv[1][3], reverse=True)[:limit]
    return [{"invocation_id": inv, "tool": tool, "tool_version": version, "first_seen": first, "last_seen": last,
             "requests": requests, "errors": errors}
            for inv, (tool, version, first, last, requests, errors) in rows]
