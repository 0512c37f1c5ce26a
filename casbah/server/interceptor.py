"""The metrics interceptor: times every call and hands the outcome to `Observability.record`.

For each call it records (exported by `casbah.server.collectors`):

- `casbah_grpc_requests_total{service, method, code, instance}`
- `casbah_grpc_request_duration_seconds{service, method, instance}` (histogram)
- `casbah_grpc_received_bytes_total` / `casbah_grpc_sent_bytes_total{service, method, instance}`:
  blob payload bytes of ByteStream Read/Write and Batch{Read,Update}Blobs
- `casbah_cache_lookups_total{cache, instance, result}`: `cas` counts digests asked by
  FindMissingBlobs (hit = present), `action_cache` counts GetActionResult (OK = hit,
  NOT_FOUND = miss), `asset` counts FetchBlob/FetchDirectory (OK with an OK status = hit)
  and BuildStream 1's GetReference (OK = hit)

and sets `casbah.logs.REQUEST_CONTEXT` from the client's `RequestMetadata`, so every
log line emitted while handling the call names the build that caused it.

It runs on every FindMissingBlobs of every build, so the per-call path is a few
dictionary lookups and integer additions (about 3 µs a call; see README's
Observability section) and takes no lock: the event loop is single-threaded.
What a method needs (its instance field, payload sizes, hit counting) is worked
out once, on its first call, and the wrapped handler is built then and kept.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

import grpc

from casbah.errors import code_from_int
from casbah.logs import REQUEST_CONTEXT, REQUEST_METHOD
from casbah.server.admission import EXEMPT_PREFIXES, Admission, QueueFull, refuse
from casbah.server.observability import UNKNOWN_INSTANCE, HitCounter, Method, Observability
from casbah.server.resource_names import RESERVED

_OK = grpc.StatusCode.OK
_NOT_FOUND = grpc.StatusCode.NOT_FOUND
_CANCELLED = grpc.StatusCode.CANCELLED
_UNKNOWN = grpc.StatusCode.UNKNOWN


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


def _resource(request: Any) -> str:
    return _instance_of_resource(request.resource_name)


def _batch_update_bytes(request: Any) -> int:
    return sum(len(r.data) for r in request.requests)


def _batch_read_bytes(response: Any) -> int:
    counted = getattr(response, "payload_bytes", None)  # pre-encoded (server/wire.py)
    return counted if counted is not None else sum(len(r.data) for r in response.responses)


def _data_bytes(message: Any) -> int:
    counted = getattr(message, "payload_bytes", None)  # pre-encoded (server/wire.py)
    return counted if counted is not None else len(message.data)


def _fmb_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is not _OK:
        return 0, 0
    missing = getattr(response, "missing_count", None)  # pre-encoded (server/wire.py)
    if missing is None:
        missing = len(response.missing_blob_digests)
    total = getattr(request, "count", None)  # parsed from its bytes (server/wire.py)
    if total is None:
        total = len(request.blob_digests)
    return total - missing, missing


def _found_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is _OK:
        return 1, 0
    return (0, 1) if code is _NOT_FOUND else (0, 0)


def _fetch_hits(request: Any, response: Any, code: grpc.StatusCode) -> tuple[int, int]:
    if code is _OK:
        return (1, 0) if response.status.code == 0 else (0, 1)
    return (0, 1) if code is _NOT_FOUND else (0, 0)


_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage"
#: Per full method name: (cache, hit/miss function) for the calls that are cache lookups.
_CACHE_METHODS: dict[str, tuple[str, HitCounter]] = {
    f"{_CAS}/FindMissingBlobs": ("cas", _fmb_hits),
    "/build.bazel.remote.execution.v2.ActionCache/GetActionResult": ("action_cache", _found_hits),
    "/build.bazel.remote.asset.v1.Fetch/FetchBlob": ("asset", _fetch_hits),
    "/build.bazel.remote.asset.v1.Fetch/FetchDirectory": ("asset", _fetch_hits),
    "/buildstream.v2.ReferenceStorage/GetReference": ("asset", _found_hits),
}
#: Blob payload bytes of one request message (of each message, for a client stream).
_IN_BYTES: dict[str, Callable[[Any], int]] = {
    f"{_CAS}/BatchUpdateBlobs": _batch_update_bytes,
    "/google.bytestream.ByteStream/Write": _data_bytes,
}
#: Blob payload bytes of one response message (of each message, for a server stream).
_OUT_BYTES: dict[str, Callable[[Any], int]] = {
    f"{_CAS}/BatchReadBlobs": _batch_read_bytes,
    "/google.bytestream.ByteStream/Read": _data_bytes,
}
#: Methods whose instance is in a resource name (of the first message, for a client stream).
_RESOURCE_NAMED = {
    "/google.bytestream.ByteStream/Read", "/google.bytestream.ByteStream/Write",
    "/google.bytestream.ByteStream/QueryWriteStatus",
}


def describe(full: str, handler: grpc.RpcMethodHandler) -> Method:
    """What the interceptor counts for the method `full`, served by `handler`."""
    request_type = _request_type(handler)
    instance_of: Callable[[Any], str] | None = None
    if full in _RESOURCE_NAMED:
        instance_of = _resource
    elif request_type is not None and "instance_name" in request_type.DESCRIPTOR.fields_by_name:
        instance_of = _instance_field
    cache, hits = _CACHE_METHODS.get(full, (None, None))
    return Method(full, instance_of, cache=cache, hits=hits, in_bytes=_IN_BYTES.get(full),
                  out_bytes=_OUT_BYTES.get(full))


def _request_type(handler: grpc.RpcMethodHandler) -> Any:
    """The request message class, recovered from the generated deserializer (`Msg.FromString`)
    or named by casbah's own (`message_type`, server/wire.py)."""
    deserializer = handler.request_deserializer
    owner = getattr(deserializer, "message_type", None) or getattr(deserializer, "__self__", None)
    return owner if isinstance(owner, type) and hasattr(owner, "DESCRIPTOR") else None


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Looks up the method's wrapped handler and sets the request context for the call.

    grpc.aio runs the interceptors and then the handler in one contextvars
    Context per call, so the context variables set here are seen by the handler
    and by everything it logs, and never by another call.
    """

    def __init__(self, obs: Observability, admission: Admission | None = None) -> None:
        self._obs = obs
        #: Calls over the concurrency limit wait here (see `casbah.server.admission`).
        self.admission = admission
        #: full method name -> (the handler grpc gave us, its wrapped version)
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        REQUEST_METHOD.set(full)
        ctx = self._obs.request_context(handler_call_details.invocation_metadata)
        if ctx is not None:
            REQUEST_CONTEXT.set(ctx)
        entry = self._handlers.get(full)
        if entry is not None and entry[0] is handler:
            return entry[1]
        return self._wrapped(full, handler)

    def _wrapped(self, full: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """Built on the first call of a method, then reused."""
        method = self._obs.method(full) or self._obs.add_method(describe(full, handler))
        admission = None if full.startswith(EXEMPT_PREFIXES) else self.admission
        wrapped = _wrap(handler, method, self._obs, admission)
        self._handlers[full] = (handler, wrapped)
        return wrapped


class _CountingRequests:
    """Wraps a client stream to count payload bytes and note the instance of its first message.

    A class, not an async generator: the servicer calls `anext(aiter(it))` again
    for every message, and a generator would also outlive an abandoned stream.
    Only the instance name is kept, never a message (a Write's first one carries
    up to a MiB of data).
    """

    __slots__ = ("_it", "_size", "instance", "instance_of", "nbytes")

    def __init__(self, requests: Any, size: Callable[[Any], int] | None,
                 instance_of: Callable[[Any], str] | None) -> None:
        self._it = aiter(requests)
        self._size = size
        self.instance_of = instance_of
        self.nbytes = 0
        self.instance: str | None = None

    def __aiter__(self) -> _CountingRequests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._it)
        if self._size is not None:
            self.nbytes += self._size(request)
        if self.instance is None and self.instance_of is not None:
            self.instance = self.instance_of(request)
        return request


class _CountingContext:
    """The servicer context of a streaming handler that writes with `context.write()`
    (ByteStream.Read): counts the payload bytes of each message it sends."""

    __slots__ = ("_context", "_size", "sent")

    def __init__(self, context: Any, size: Callable[[Any], int]) -> None:
        self._context = context
        self._size = size
        self.sent = 0

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self.sent += self._size(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _code_of(context: Any, default: grpc.StatusCode = _OK) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return default
    if isinstance(code, grpc.StatusCode):
        return code
    return code_from_int(code)  # an int, from set_code(int) in foreign handlers


def _failure_code(exc: BaseException, context: Any) -> grpc.StatusCode:
    """The status of a call its handler left by raising `exc`."""
    if isinstance(exc, grpc.aio.AbortError):
        return _code_of(context, _UNKNOWN)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):  # GeneratorExit: a stream closed early
        return _CANCELLED
    return _UNKNOWN


_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _wrap(handler: grpc.RpcMethodHandler, method: Method, obs: Observability,
          admission: Admission | None = None) -> grpc.RpcMethodHandler:
    """A handler of the same shape whose behaviour times the call and records it.

    One wrapper for all four shapes: a client stream is wrapped in
    `_CountingRequests` (payload bytes per message, instance from the first), a
    unary request is measured once the call succeeded; a response stream is counted
    per message as it is sent, a unary response once.  grpc.aio accepts a streaming
    handler written as an async generator or as a coroutine writing with
    `context.write()` (grpc_health's Watch), so the behaviour is an async generator
    exactly when the handler's is, and a coroutine otherwise.  With `admission`, the
    handler runs only once the call holds a slot (it waits for one when all are taken).
    """
    inner: Callable[..., Any] | None = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream)
    if inner is None:
        return handler  # nothing to time
    client_streams = handler.request_streaming
    instance_of = method.instance_of
    labels = obs.labels
    record = obs.record
    in_bytes = method.in_bytes
    out_bytes = method.out_bytes
    perf_counter = time.perf_counter
    #: A streaming handler that writes its responses with `context.write()`.
    writes = handler.response_streaming and inspect.iscoroutinefunction(inner)
    #: The label of a client stream that ended before its first message.
    no_message = UNKNOWN_INSTANCE if instance_of is not None else ""

    def finish_unary(started: float, code: grpc.StatusCode, request: Any, response: Any, sent: int) -> None:
        ok = code is _OK
        record(method, labels.get(instance_of(request), UNKNOWN_INSTANCE) if instance_of is not None else "",
               code, started, request, response,
               in_bytes(request) if in_bytes is not None and ok else 0,
               out_bytes(response) if out_bytes is not None and ok and response is not None else sent)

    def finish_stream(started: float, code: grpc.StatusCode, counted: Any, response: Any, sent: int) -> None:
        instance = labels.get(counted.instance, UNKNOWN_INSTANCE) if counted.instance is not None else no_message
        record(method, instance, code, started, None, None, counted.nbytes, sent)

    finish = finish_stream if client_streams else finish_unary

    async def admit(context) -> bool:
        """Wait for a slot; False when there is no admission to hold one."""
        if admission is None:
            return False
        if not admission.try_enter():
            try:
                await admission.wait()
            except QueueFull:
                await refuse(context, admission)
        return True

    async def streamed(request, context):
        started = perf_counter()
        if client_streams:
            request = _CountingRequests(request, in_bytes, instance_of)
        code = _OK
        sent = 0
        admitted = False
        try:
            admitted = await admit(context)
            async for response in inner(request, context):
                if out_bytes is not None:
                    sent += out_bytes(response)
                yield response
            code = _code_of(context)
        except BaseException as exc:
            code = _failure_code(exc, context)
            raise
        finally:
            if admitted and admission is not None:
                admission.leave()
            finish(started, code, request, None, sent)

    async def awaited(request, context):
        started = perf_counter()
        if client_streams:
            request = _CountingRequests(request, in_bytes, instance_of)
        code = _OK
        response = None
        admitted = False
        counting = _CountingContext(context, out_bytes) if writes and out_bytes is not None else None
        try:
            admitted = await admit(context)
            response = await inner(request, counting or context)
            code = _code_of(context)
            return response
        except BaseException as exc:
            code = _failure_code(exc, context)
            raise
        finally:
            if admitted and admission is not None:
                admission.leave()
            finish(started, code, request, response, counting.sent if counting is not None else 0)

    behaviour = streamed if handler.response_streaming and not writes else awaited
    factory = _FACTORIES[(client_streams, handler.response_streaming)]
    return factory(behaviour, handler.request_deserializer, handler.response_serializer)
