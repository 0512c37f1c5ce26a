"""Admission: at most `max-concurrent-rpcs` handlers run at once; further calls wait their turn.

gRPC's own limit (`maximum_concurrent_rpcs`) refuses the extra calls at once, and an
HTTP/2 stream limit below a client's burst resets the streams the client opened
before it learned the limit (REFUSED_STREAM): a build that fires 2,000
FindMissingBlobs at once would see hundreds fail.  Here a call over the limit waits
in a FIFO queue for a running one to end; only when the queue itself is full
(`max-queued-rpcs`), so waiting is impossible, is it refused with RESOURCE_EXHAUSTED
carrying a `google.rpc.RetryInfo`, which tells clients when to try again.

The fast path (a free slot, nobody waiting) is two integer operations and no await:
it runs on every call.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

#: Suggested by the RetryInfo of a refused call.
RETRY_DELAY = 1.0
#: Never queued: a health check must answer while the server is busy (a load balancer
#: that sees it time out takes a working server out of rotation).
EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class QueueFull(Exception):
    """The wait queue is full: the call is refused (see `refuse`)."""


class Admission:
    def __init__(self, limit: int, queue_limit: int) -> None:
        self.limit = limit
        self.queue_limit = queue_limit
        self.running = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def try_enter(self) -> bool:
        """Take a slot if one is free and nobody is ahead in the queue."""
        if self.running < self.limit and not self._waiters:
            self.running += 1
            return True
        return False

    async def wait(self) -> None:
        """Wait for a slot (FIFO); raises QueueFull when even the queue is full."""
        if len(self._waiters) >= self.queue_limit:
            raise QueueFull
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot just as the caller left
                self.leave()
            else:
                self._waiters.remove(waiter)
            raise

    def leave(self) -> None:
        """A call ended: hand its slot to the first waiter still waiting, else free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `running` stays the same
                return
        self.running -= 1


def retry_details(message: str, delay: float = RETRY_DELAY) -> tuple[tuple[str, bytes], ...]:
    """Trailing metadata with a `google.rpc.Status` whose details hold a RetryInfo."""
    seconds = int(delay)
    retry = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int((delay - seconds) * 1e9)))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message)
    status.details.add().Pack(retry)
    return (("grpc-status-details-bin", status.SerializeToString()),)


async def refuse(context, admission: Admission) -> None:
    message = (f"server busy: {admission.running} calls running and {admission.waiting} waiting "
               f"(limits.max-concurrent-rpcs {admission.limit}, max-queued-rpcs {admission.queue_limit}); "
               f"retry in {RETRY_DELAY:.0f}s")
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message, trailing_metadata=retry_details(message))
