"""What every servicer shares: instance lookup and error translation.

Servicers raise `casbah.errors` exceptions; the `rpc`/`rpc_stream` wrappers turn
them into gRPC statuses with one table (`casbah.errors.status_code`), and log
anything unexpected with its traceback before answering INTERNAL.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from casbah.cdc import FastCdcParams
from casbah.config import AuthConfig, LimitsConfig
from casbah.digest import DEFAULT_FUNCTIONS, Digest, DigestFunction, make_digest
from casbah.errors import (
    CasbahError,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unsupported,
    echo,
    from_os_error,
    is_no_space,
    status_code,
)
from casbah.server.audit import begin_call, finish_write_audit
from casbah.server.auth import Authorizer
from casbah.storage.action_cache import ActionCache
from casbah.storage.base import Storage

log = logging.getLogger("casbah.server")


@dataclass
class Instance:
    """One instance name and what backs it."""

    name: str
    cas: Storage
    action_cache: ActionCache
    services: frozenset[str]
    read_only: bool = False
    extras: dict[str, object] = field(default_factory=dict)
    #: What this instance serves and advertises, in its config's order.
    digest_functions: tuple[DigestFunction, ...] = DEFAULT_FUNCTIONS
    #: FastCDC 2020 parameters SplitBlob cuts with and Capabilities advertises (None:
    #: chunking is off for this instance).
    chunking: FastCdcParams | None = field(default_factory=FastCdcParams)
    #: Where SplitBlob spools a blob it chunks (None: the system's temporary directory).
    spool_dir: Path | None = None

    def check_writable(self, what: str) -> None:
        if self.read_only:
            raise PermissionDenied(f"instance {echo(self.name)} is read-only: {what} refused")

    def digest_function(self, value: int, hash_hex: str | None = None) -> DigestFunction:
        """The function a request means: its `digest_function`, or when unset the one
        the (first) hash's length implies, as REAPI tells servers to infer for old
        clients; refused unless this instance enables it."""
        return self.check_function(DigestFunction.from_proto(value, hash_hex))

    def check_function(self, function: DigestFunction) -> DigestFunction:
        if function not in self.digest_functions:
            enabled = ", ".join(f.value for f in self.digest_functions)
            raise InvalidArgument(f"digest function {function.value} is not enabled on instance {self.name!r} "
                                  f"(enabled: {enabled})")
        return function

    def digest(self, message, value: int) -> Digest:
        """One validated digest of a request whose `digest_function` is `value`."""
        return make_digest(message.hash, message.size_bytes, self.digest_function(value, message.hash))


class Instances:
    """The instance registry every servicer resolves request names against."""

    def __init__(self, instances: dict[str, Instance], max_batch_size: int, max_message_size: int,
                 authorizer: Authorizer | None = None, limits: LimitsConfig | None = None) -> None:
        self._by_name = instances
        self.max_batch_size = max_batch_size
        self.max_message_size = max_message_size
        self.authorizer = authorizer or Authorizer(AuthConfig())
        self.limits = limits or LimitsConfig()
        self.uploads = ByteBudget(self.limits.upload_bytes_in_flight)

    def get(self, name: str, service: str | None = None, context=None, *, write: bool = False,
            what: str = "", detail: str = "", authorize: bool = True) -> Instance:
        """Resolve an instance and, given the call's context, check the caller may read
        (or `write`) it; `what` and `detail` (e.g. a digest) go to the audit log.
        `authorize=False` resolves only (a service that validates the request before the
        scope check), yet still tells an unknown name only to a caller who may know it."""
        instance = self._by_name.get(name)
        if instance is None:
            raise self._unknown(name, context)
        if context is not None and authorize:
            self.authorizer.check(context, name, write, what or service or "call", detail,
                                  action_cache=service == "action-cache")
        if service is not None and service not in instance.services:
            raise Unsupported(f"instance {echo(name)} does not serve the {service} service")
        return instance

    def _unknown(self, name: str, context) -> Exception:
        """The error for an unknown instance name: it lists only the names the caller may
        read, and a caller without valid credentials learns none (UNAUTHENTICATED)."""
        shown = self.authorizer.visible(context, self.names())
        if shown is None:
            return Unauthenticated(f"instance {echo(name)}: credentials needed")
        served = ", ".join(echo(n) for n in shown) or "none you may read"
        return InvalidArgument(f"unknown instance name {echo(name)}; this server serves {served}")

    def __iter__(self):
        return iter(self._by_name.values())

    def names(self) -> list[str]:
        return sorted(self._by_name)


class ByteBudget:
    """Upload bytes the server holds at once, across all calls.

    A request over the budget is refused at once (RESOURCE_EXHAUSTED, which
    clients retry with backoff) instead of queueing: the bytes are already in
    memory by the time a handler runs, so waiting would only hold more.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self, n: int, what: str) -> None:
        if self.used + n > self.limit and self.used:
            raise ResourceExhausted(
                f"{what}: {self.used} bytes of uploads already in flight (limit {self.limit}); retry later"
            )
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n


async def next_message(requests, idle_seconds: float, what: str):
    """The next message of a client stream, or None at its end.

    A stream that sends nothing for `idle_seconds` is closed: an idle upload
    holds a session, a queue and a concurrency slot, and a slowloris client would
    open them by the hundred.
    """
    try:
        return await asyncio.wait_for(anext(aiter(requests), None), idle_seconds)
    except TimeoutError:
        raise DeadlineExceeded(f"{what}: no message for {idle_seconds:.0f}s; closing the idle stream") from None


class _Malformed:
    """What a request that is not a valid message deserializes to (see `MalformedRequests`)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserializer: Callable) -> Callable:
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever else garbage makes a parser raise
            return _Malformed(exc)

    return parse


class MalformedRequests(grpc.aio.ServerInterceptor):
    """Answers a unary request that does not parse with INVALID_ARGUMENT.

    grpc.aio deserializes the request of a unary call before any handler runs and
    answers UNKNOWN (with a traceback in the log) when that fails: a client's bad
    bytes would look like a server bug.  This interceptor swaps in a deserializer
    that never raises and refuses the call itself.  It must be the outermost
    interceptor, so no other sees the placeholder.  Messages of a client stream
    are parsed inside the handler; `rpc` maps their DecodeError the same way.
    """

    def __init__(self) -> None:
        self._handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method = handler_call_details.method
        cached = self._handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _refuse_malformed(handler, method)
        self._handlers[method] = (handler, wrapped)
        return wrapped


def _refuse_malformed(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserializer = _tolerant(handler.request_deserializer)

    async def refuse(request: _Malformed, context) -> None:
        log.debug("%s: request does not parse: %s", method, request.error)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"{method}: the request is not a valid message: {request.error}")

    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, handler.response_serializer)
    inner = handler.unary_stream
    if inspect.iscoroutinefunction(inner):  # a handler that writes with context.write()

        async def unary_stream_writer(request, context):
            if isinstance(request, _Malformed):
                await refuse(request, context)
            return await inner(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream_writer, deserializer, handler.response_serializer)

    async def unary_stream(request, context):
        if isinstance(request, _Malformed):
            await refuse(request, context)
        async for response in inner(request, context):
            yield response

    return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, handler.response_serializer)


#: Longest status message sent: it travels in a header, which clients limit (16 KiB by default).
MAX_STATUS_MESSAGE = 2000


def bounded(message: str) -> str:
    """A status message cut to `MAX_STATUS_MESSAGE` (a backstop: messages echo client input
    through `casbah.errors.echo`, which is shorter still)."""
    return message if len(message) <= MAX_STATUS_MESSAGE else message[:MAX_STATUS_MESSAGE - 1] + "…"


def no_space(exc: BaseException) -> bool:
    """A full store, raised as such or as the ResourceExhausted `from_os_error` made of it."""
    return is_no_space(exc) or (exc.__cause__ is not None and is_no_space(exc.__cause__))


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call with the status `casbah.errors.status_code` gives `exc`: the same
    table per-blob statuses use, so a cause has one status whichever way it reaches
    the client.  Only what that table cannot name (INTERNAL) is logged with a traceback;
    a full store is one WARNING line per call, without one."""
    if isinstance(exc, DecodeError):  # a message of a client stream that does not parse
        log.debug("%s: a request message does not parse: %s", method, exc)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            bounded(f"{method}: a request message does not parse: {exc}"))
    if is_no_space(exc) and not isinstance(exc, CasbahError):  # a store that did not name itself
        exc = from_os_error(exc, "storage")
    code = status_code(exc)
    if isinstance(exc, CasbahError):
        if no_space(exc):
            log.warning("%s: %s: %s", method, code.name, exc)
        else:
            log.debug("%s: %s: %s", method, code.name, exc)
        await context.abort(code, bounded(str(exc)))
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed unexpectedly", method)
        await context.abort(code, bounded(f"{method}: internal error: {type(exc).__name__}: {exc}"))
    message = bounded(f"{method}: {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
    log.warning("%s (%s)", message, code.name)
    await context.abort(code, message)


def _outcome(context, exc: BaseException | None) -> str:
    """The audit outcome of a call that ended by raising `exc` (None: it returned)."""
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    if isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if isinstance(exc, DecodeError):
        return "INVALID_ARGUMENT"
    return status_code(exc).name


def rpc(fn: Callable) -> Callable:
    """Wrap a unary-response handler (unary-unary or stream-unary)."""

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        begin_call()
        try:
            response = await fn(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError) as exc:
            finish_write_audit(_outcome(context, exc))
            raise
        except Exception as exc:
            finish_write_audit(_outcome(context, exc))
            await _abort(context, exc, fn.__qualname__)
        finish_write_audit("OK")
        return response

    return wrapper


def rpc_stream(fn: Callable) -> Callable:
    """Wrap a server-streaming handler written as an async generator."""

    @functools.wraps(fn)
    async def wrapper(self, request, context) -> AsyncIterator:
        try:
            async for item in fn(self, request, context):
                yield item
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await _abort(context, exc, fn.__qualname__)

    return wrapper
