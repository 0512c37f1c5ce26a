"""Log formatting and the request context every log line carries.

A cache server's log is only useful when a line can be tied back to the build
that caused it: REAPI clients send a `RequestMetadata` header (tool name and
version, invocation id, action id) on every call.  The gRPC interceptor in
`casbah.server.interceptor` puts what it parsed from that header in the
`REQUEST_CONTEXT` context variable for the duration of the call (every RPC runs
in its own context, so concurrent calls never see each other's ids), and
`RequestContextFilter` copies it onto every record logged meanwhile, whichever
logger emitted it.  This module imports nothing heavy: the CLI configures logging
before it knows whether it will start a server.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import NamedTuple

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(request_ids)s"


class RequestContext(NamedTuple):
    """What one call's `RequestMetadata` says about its origin; '' when not sent."""

    tool_name: str = ""
    tool_version: str = ""
    invocation_id: str = ""
    action_id: str = ""
    correlated_invocations_id: str = ""
    target_id: str = ""
    action_mnemonic: str = ""


#: The request being handled by the current task (None outside an RPC or when the
#: client sent no RequestMetadata).
REQUEST_CONTEXT: ContextVar[RequestContext | None] = ContextVar("casbah_request_context", default=None)
#: The full gRPC method being handled ("/service/Method"), or None outside an RPC.
REQUEST_METHOD: ContextVar[str | None] = ContextVar("casbah_request_method", default=None)

#: Record attributes the filter sets; the JSON formatter emits the non-empty ones.
_ID_FIELDS = ("tool_name", "tool_version", "invocation_id", "action_id", "correlated_invocations_id")


class RequestContextFilter(logging.Filter):
    """Adds the current request's ids to a record (empty strings outside a request).

    Installed on handlers, not loggers: a filter on a logger only sees records
    logged through that exact logger, while a handler sees every propagated one.
    `request_ids` is a ready-made suffix for the text format.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = REQUEST_CONTEXT.get()
        method = REQUEST_METHOD.get()
        record.rpc = method or ""
        if ctx is None:
            for name in _ID_FIELDS:
                setattr(record, name, "")
            record.request_ids = f" [rpc={method}]" if method else ""
            return True
        for name in _ID_FIELDS:
            setattr(record, name, getattr(ctx, name))
        parts = [f"rpc={method}"] if method else []
        if ctx.tool_name:
            parts.append(f"tool={ctx.tool_name}" + (f"/{ctx.tool_version}" if ctx.tool_version else ""))
        if ctx.invocation_id:
            parts.append(f"invocation={ctx.invocation_id}")
        if ctx.action_id:
            parts.append(f"action={ctx.action_id}")
        record.request_ids = f" [{' '.join(parts)}]" if parts else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request's ids.

    For log shippers (Loki, Elasticsearch, journald's JSON mode) that index
    fields: a search for an invocation id then finds every line of that build.
    Keys with no value are left out rather than written empty.
    """

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            entry["worker"] = self.worker
        rpc = getattr(record, "rpc", "")
        if rpc:
            entry["rpc"] = rpc
        for name in _ID_FIELDS:
            value = getattr(record, name, "")
            if value:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _iso_time(created: float) -> str:
    """UTC with milliseconds, e.g. 2024-05-01T12:00:00.123Z: sortable and unambiguous."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def setup_logging(level: str, fmt: str = "text", worker: int | None = None) -> None:
    """Configure the root logger: one stderr handler with the request-context filter.

    Callable again (it replaces the handler) because the format may only be known
    once the config file has been read.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestContextFilter())
    text = TEXT_FORMAT if worker is None else TEXT_FORMAT.replace("%(name)s", f"worker{worker} %(name)s")
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else logging.Formatter(text))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
