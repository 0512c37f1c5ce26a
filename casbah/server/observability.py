"""What a server counts about its calls: the state the interceptor fills and the
collectors and status page read.

The pieces, one job per module:

- here: `Observability`, per server: plain-int counters per (method, instance)
  (`Series`), per-minute hit/miss and request/error counts of the last hour
  (`MinuteWindow`), a ring of recent requests with the client's `RequestMetadata`
  (tool, invocation id, action id), and recent invocations;
- `casbah.server.interceptor`: the `grpc.aio.ServerInterceptor` that times every
  call and calls `Observability.record`;
- `casbah.server.collectors`: turns the counts into Prometheus families at scrape
  time, plus the storage gauges;
- `casbah.server.status_data`: the storage-graph walk and the status page's JSON;
- `casbah.server.http` and `casbah.server.status_page`: gRPC health/reflection and
  the HTTP side (`/metrics`, `/healthz`, the page).

Counting goes to plain ints, not prometheus_client's `Counter.inc`/
`Histogram.observe`, which take a lock and validate on every call: that cost
about 6 µs per RPC here for nothing (the event loop is single-threaded).  The
parsed metadata is cached by its raw bytes (a build sends the same header bytes
for all calls of an action).  Nothing here imports the interceptor, the HTTP
side or the status page: they all read this module's public state.
"""

from __future__ import annotations

import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import grpc

from casbah.logs import REQUEST_CONTEXT, RequestContext
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"

#: Upper bounds (seconds) of the latency histogram's buckets; +Inf is implied.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0)

CACHES = ("cas", "action_cache", "asset")
#: Label for instance names the server does not serve: a client could otherwise
#: create one time series per name it invents.
UNKNOWN_INSTANCE = "(unknown)"
WINDOW_MINUTES = 60
RECENT_REQUESTS = 500
MAX_INVOCATIONS = 1000
_METADATA_CACHE = 4096
_MISSING: Any = object()

_OK = grpc.StatusCode.OK
_NOT_FOUND = grpc.StatusCode.NOT_FOUND

#: (request, response, code) -> (hits, misses) of one cache lookup.
HitCounter = Callable[[Any, Any, grpc.StatusCode], tuple[int, int]]


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


class Method:
    """One gRPC method as the interceptor classified it, and its counts per instance.

    `instance_of` maps a request message to its instance name; `in_bytes` and
    `out_bytes` give the blob payload of one request or response message (None for
    methods that carry none); `cache` and `hits` are set for cache lookups.
    """

    __slots__ = ("cache", "full", "hits", "in_bytes", "instance_of", "name", "out_bytes", "series", "service", "short")

    def __init__(self, full: str, instance_of: Callable[[Any], str] | None, *, cache: str | None = None,
                 hits: HitCounter | None = None, in_bytes: Callable[[Any], int] | None = None,
                 out_bytes: Callable[[Any], int] | None = None) -> None:
        self.full = full
        service, _, self.name = full.lstrip("/").rpartition("/")
        self.service = service
        self.short = f"{service.rpartition('.')[2]}.{self.name}"
        self.instance_of = instance_of
        self.cache = cache
        self.hits = hits
        self.in_bytes = in_bytes
        self.out_bytes = out_bytes
        self.series: dict[str, Series] = {}


class Series:
    """Everything counted for one (method, instance): plain ints, read at scrape time."""

    __slots__ = ("errors", "instance", "latency", "latency_sum", "method", "ok", "received", "requests", "sent",
                 "window")

    def __init__(self, method: Method, instance: str, obs: Observability) -> None:
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


def _parse_metadata(raw: bytes) -> RequestContext | None:
    try:
        md = re_pb2.RequestMetadata.FromString(raw)
    except Exception:  # a malformed header must not fail the call it rides on
        return None
    return RequestContext(md.tool_details.tool_name, md.tool_details.tool_version, md.tool_invocation_id,
                          md.action_id, md.correlated_invocations_id, md.target_id, md.action_mnemonic)


class Observability:
    """The per-server state the interceptor fills and the collectors and status page read."""

    def __init__(self, instances: Iterable[Any], *, listen: Iterable[str] = (), version: str = "") -> None:
        self.instances = list(instances)
        #: Served instance names -> themselves; "" always (methods without an instance).
        #: Read on every call: a name not in here is counted as UNKNOWN_INSTANCE.
        self.labels = {inst.name: inst.name for inst in self.instances}
        self.labels[""] = ""
        self.listen = list(listen)
        self.version = version
        self.started = time.time()
        #: Set when the server starts draining (the status page and /healthz say so).
        self.shutting_down = False
        self._hit_windows: dict[tuple[str, str], MinuteWindow] = {}
        self._request_windows: dict[str, MinuteWindow] = {}
        #: (time, method, code, instance, seconds, RequestContext | None), newest last.
        self.recent: deque[tuple] = deque(maxlen=RECENT_REQUESTS)
        #: invocation id -> [tool, version, first seen, last seen, requests, errors]
        self.invocations: dict[str, list] = {}
        self._metadata: dict[bytes, RequestContext | None] = {}
        self._methods: dict[str, Method] = {}
        _LIVE.add(self)
        for inst in self.instances:
            for cache in CACHES:
                self.hit_window(inst.name, cache)
            self.request_window(inst.name)

    # -- windows and methods ---------------------------------------------------------

    def hit_window(self, instance: str, cache: str) -> MinuteWindow:
        """Hits (a) and misses (b) per minute of one cache of one instance."""
        window = self._hit_windows.get((instance, cache))
        if window is None:
            window = self._hit_windows[(instance, cache)] = MinuteWindow()
        return window

    def hit_windows(self) -> list[tuple[tuple[str, str], MinuteWindow]]:
        """Every ((instance, cache), window), for the lookup counters."""
        return list(self._hit_windows.items())

    def request_window(self, instance: str) -> MinuteWindow:
        """Calls (a) and failed calls (b) per minute for one instance."""
        window = self._request_windows.get(instance)
        if window is None:
            window = self._request_windows[instance] = MinuteWindow()
        return window

    def method(self, full: str) -> Method | None:
        """The method called `full` ("/service/Method"), once it has been called."""
        return self._methods.get(full)

    def add_method(self, method: Method) -> Method:
        """Start counting `method`; the first one registered under a name is kept."""
        return self._methods.setdefault(method.full, method)

    def methods(self) -> list[Method]:
        """Every method called so far, with its series."""
        return list(self._methods.values())

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

    def series(self, method: Method, instance: str) -> Series:
        series = method.series.get(instance)
        if series is None:
            series = method.series[instance] = Series(method, instance, self)
        return series

    def record(self, method: Method, instance: str, code: grpc.StatusCode, started: float,
               request: Any, response: Any, nbytes_in: int, nbytes_out: int) -> None:
        """Everything recorded about one finished call (`started`: its `perf_counter()`)."""
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
        if series.window is not None and method.hits is not None:
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


_LIVE: weakref.WeakSet[Observability] = weakref.WeakSet()


def live() -> list[Observability]:
    """Every `Observability` of this process still in use (one per server; tests and
    benchmarks may run several), for collectors that sum over them."""
    return list(_LIVE)


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
