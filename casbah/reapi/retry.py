"""Retries with exponential backoff and full jitter, on transient gRPC codes only.

UNAVAILABLE, RESOURCE_EXHAUSTED and ABORTED are always safe to retry (the server
did not do the work, or the work is idempotent anyway: CAS writes are).
DEADLINE_EXCEEDED is retried only for idempotent calls, since a timed-out call
may have done its work.  Everything else is final: retrying INVALID_ARGUMENT
(say, a digest mismatch) can only fail again.

Both a raw `grpc.RpcError` and a casbah error carrying one of those codes count
as transient: the remote backend raises casbah errors for failures it detects
itself (a stalled stream, a read that ended short), and those are as worth a
retry as the gRPC statuses they stand for.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from casbah.errors import CasbahError, from_status

log = logging.getLogger(__name__)
T = TypeVar("T")

TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED})


#: What grpc-core reports, as INTERNAL or UNKNOWN, when the connection under a call breaks
#: (the peer was killed, a socket reset): a transport failure, not a server bug.
_TRANSPORT_DETAILS = ("Internal error from Core", "Socket closed", "Connection reset", "Broken pipe",
                      "Stream removed", "GOAWAY", "Connection refused")


def transport_code(code: grpc.StatusCode, details: str) -> grpc.StatusCode:
    """UNAVAILABLE for a call that failed because its connection broke, whatever code gRPC gave it."""
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(t in details for t in _TRANSPORT_DETAILS):
        return grpc.StatusCode.UNAVAILABLE
    return code


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 3
    base_backoff: float = 0.1
    max_backoff: float = 5.0
    #: Seconds a unary call may take, and a stream may go without progress; None = no limit.
    request_timeout: float | None = 60.0

    def delay(self, attempt: int) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2^n)]."""
        return random.uniform(0, min(self.max_backoff, self.base_backoff * (2**attempt)))

    def retryable(self, code: grpc.StatusCode, idempotent: bool) -> bool:
        return code in TRANSIENT or (idempotent and code == grpc.StatusCode.DEADLINE_EXCEEDED)

    def _classify(self, exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
        if isinstance(exc, grpc.RpcError):
            # AioRpcError and the sync errors have code()/details() without being grpc.Call.
            code = getattr(exc, "code", None)
            details = getattr(exc, "details", None)
            if callable(code):
                text = (details() if callable(details) else "") or ""
                return transport_code(code(), text), text
            return grpc.StatusCode.UNKNOWN, str(exc)
        if isinstance(exc, CasbahError):
            return exc.code, str(exc)
        return None

    def _final(self, exc: BaseException, code: grpc.StatusCode, details: str, what: str) -> BaseException:
        if isinstance(exc, CasbahError):
            return exc
        return from_status(code, f"{what}: {code.name}: {details}")

    async def call(self, fn: Callable[[], Awaitable[T]], what: str, idempotent: bool = True) -> T:
        """Run `fn` (an RPC) with retries; a final gRPC failure becomes a casbah error."""
        attempt = 0
        while True:
            try:
                return await fn()
            except (grpc.RpcError, CasbahError) as exc:
                code, details = self._classify(exc) or (grpc.StatusCode.UNKNOWN, str(exc))
                if attempt >= self.retries or not self.retryable(code, idempotent):
                    raise self._final(exc, code, details, what) from None
                delay = self.delay(attempt)
                log.info("%s: %s (%s); retry %d/%d in %.2fs", what, code.name, details, attempt + 1,
                         self.retries, delay)
                attempt += 1
                await asyncio.sleep(delay)
