"""ByteStream both ways, for the CAS client: reads that resume, writes that resume.

- a read that loses its connection, stalls (no message within the request
  timeout) or ends short resumes from the offset already delivered;
- a write from a source that can be reopened at an offset (a file, bytes in
  memory) resumes at the server's `committed_size` (QueryWriteStatus) after a
  transient failure; a write from a one-shot stream (a client's upload passing
  through) cannot be replayed, so it fails with the transient status and its
  own client retries, as Bazel does;
- zstd on the wire when asked (`compressed-blobs/zstd/...`).

Nothing partial is ever committed: the server commits an upload only once
`finish_write` arrived and the digest verified, and `finish_write` is sent only
after the stream verified here.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable

import grpc

from casbah import compression
from casbah.digest import Digest
from casbah.errors import (
    BlobNotFound,
    DataLoss,
    DeadlineExceeded,
    DigestMismatch,
    InvalidArgument,
    Unavailable,
    from_status,
)
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.reapi.connection import AsyncRemote
from casbah.reapi.retry import TRANSIENT, transport_code
from casbah.streams import CHUNK_SIZE, Verifier, coalesce, hashed

log = logging.getLogger(__name__)

#: Opens a replayable source at an offset (a file, bytes in memory).
Reopen = Callable[[int], AsyncIterable[bytes]]


async def read_stream(remote: AsyncRemote, digest: Digest, offset: int, limit: int, expected: int,
                      zstd: bool) -> AsyncIterator[bytes]:
    """ByteStream.Read of `expected` bytes that resumes from what it delivered after a
    transient failure, a stall or a stream that ends short.  NOT_FOUND is BlobNotFound."""
    stubs = remote.stubs()
    policy = remote.policy
    what = f"read {digest} on {remote.describe()}"
    delivered = 0
    attempt = 0
    while True:
        request = bs_pb2.ReadRequest(resource_name=remote.blob_path(digest, zstd), read_offset=offset + delivered,
                                     read_limit=(limit - delivered) if limit else 0)
        call = stubs.bytestream.Read(request, metadata=remote.metadata)
        decompressor = compression.Decompressor(expected - delivered) if zstd else None
        try:
            while True:
                try:
                    async with asyncio.timeout(policy.request_timeout):
                        response = await call.read()
                except TimeoutError:
                    raise DeadlineExceeded(f"no data for {policy.request_timeout}s") from None
                if response is grpc.aio.EOF:
                    break
                try:
                    data = decompressor.feed(response.data) if decompressor else response.data
                except InvalidArgument as exc:  # the remote's zstd is corrupt: its data, not ours
                    raise DataLoss(f"{what}: {exc}") from None
                if not data:
                    continue
                if delivered + len(data) > expected:
                    raise DataLoss(f"{what}: the remote sent more than the {expected} bytes asked for")
                delivered += len(data)
                attempt = 0
                if len(data) <= CHUNK_SIZE:
                    yield data
                else:
                    view = memoryview(data)
                    for i in range(0, len(data), CHUNK_SIZE):
                        yield bytes(view[i : i + CHUNK_SIZE])
            if delivered == expected:
                return
            code, details = grpc.StatusCode.UNAVAILABLE, f"stream ended after {delivered} of {expected} bytes"
        except grpc.RpcError as exc:
            code, details = transport_code(exc.code(), exc.details() or ""), exc.details()
        except DeadlineExceeded as exc:
            code, details = exc.code, str(exc)
        finally:
            call.cancel()
        if code == grpc.StatusCode.NOT_FOUND:
            raise BlobNotFound(digest, f"not on {remote.describe()}")
        if attempt >= policy.retries or not policy.retryable(code, idempotent=True):
            raise from_status(code, f"{what} at offset {offset + delivered}: {code.name}: {details}")
        delay = policy.delay(attempt)
        log.info("%s: %s (%s) after %d bytes; resuming in %.2fs (retry %d/%d)", what, code.name, details,
                 delivered, delay, attempt + 1, policy.retries)
        attempt += 1
        await asyncio.sleep(delay)


async def write_stream(remote: AsyncRemote, digest: Digest, chunks: AsyncIterable[bytes], verifier: Verifier,
                       zstd: bool, resource: str | None = None, offset: int = 0) -> None:
    """One ByteStream.Write of `chunks` (the blob from `offset`).  Raises grpc.RpcError
    (for the caller to retry or translate), DeadlineExceeded when the remote stops
    taking data, or whatever broke the source stream (DigestMismatch included)."""
    stubs = remote.stubs()
    timeout = remote.policy.request_timeout
    resource = resource or remote.upload_path(str(uuid.uuid4()), digest, zstd)
    what = f"write {digest} on {remote.describe()}"
    loop = asyncio.get_running_loop()
    failure: list[BaseException] = []
    #: When the remote last took a message; None while we wait for our own source.
    waiting_since: list[float | None] = [None]

    async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
        try:
            position = offset
            pending: bytes | None = None
            source: AsyncIterator[bytes] = hashed(chunks, verifier)
            if zstd:
                source = compression.compress_stream(source)
            async for chunk in coalesce(source, CHUNK_SIZE):
                if pending is not None:
                    waiting_since[0] = loop.time()
                    yield bs_pb2.WriteRequest(resource_name=resource, write_offset=position, data=pending)
                    waiting_since[0] = None
                    position += len(pending)
                pending = chunk
            verifier.finish()  # a mismatch abandons the stream: finish_write is never sent
            waiting_since[0] = loop.time()
            yield bs_pb2.WriteRequest(resource_name=resource, write_offset=position, data=pending or b"",
                                      finish_write=True)
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException as exc:
            failure.append(exc)
            raise

    call = stubs.bytestream.Write(requests(), metadata=remote.metadata)
    stalled = False

    async def watchdog() -> None:
        nonlocal stalled
        while timeout is not None:
            await asyncio.sleep(min(1.0, timeout / 4))
            since = waiting_since[0]
            if since is not None and loop.time() - since > timeout:
                stalled = True
                call.cancel()
                return

    dog = loop.create_task(watchdog())
    try:
        response = await call
    except (grpc.RpcError, asyncio.CancelledError) as exc:
        if failure:
            raise failure[0] from None  # what broke our own stream: DigestMismatch, a client gone
        if stalled:
            raise DeadlineExceeded(f"{what}: the remote took no data for {timeout}s") from None
        if isinstance(exc, asyncio.CancelledError) and not _being_cancelled():
            raise Unavailable(f"{what}: the call was cancelled") from None
        raise
    finally:
        dog.cancel()
        call.cancel()
    if not zstd and response.committed_size not in (digest.size, -1):
        raise DigestMismatch(f"{remote.describe()} committed {response.committed_size} bytes of {digest}")


async def write_resumable(remote: AsyncRemote, digest: Digest, reopen: Reopen, make_verifier: Callable[[], Verifier],
                          zstd: bool) -> None:
    """ByteStream.Write from a replayable source, resuming at the server's committed_size
    (QueryWriteStatus) after a transient failure; a fresh upload when the server forgot it."""
    policy = remote.policy
    resource = remote.upload_path(str(uuid.uuid4()), digest, zstd)
    offset = 0
    attempt = 0
    while True:
        # A resumed write cannot hash what it skips: verify the whole source only from 0.
        verifier = make_verifier() if offset == 0 else _Counted(digest, offset)
        try:
            await write_stream(remote, digest, reopen(offset), verifier, zstd, resource, offset)
            return
        except grpc.RpcError as exc:
            code = transport_code(exc.code(), exc.details() or "")
            if code not in TRANSIENT or attempt >= policy.retries:
                raise from_status(code, f"write {digest} on {remote.describe()}: {code.name}: "
                                        f"{exc.details()}") from None
            reason = code.name
        except (Unavailable, DeadlineExceeded) as exc:
            if attempt >= policy.retries:
                raise
            reason = type(exc).__name__
        attempt += 1
        committed = None if zstd else await _committed(remote, resource)
        if not committed:  # unknown upload (or compressed: offsets are of the compressed stream)
            resource, committed = remote.upload_path(str(uuid.uuid4()), digest, zstd), 0
        offset = committed
        log.info("write %s interrupted (%s); resuming at %d", digest, reason, offset)
        await asyncio.sleep(policy.delay(attempt))


async def _committed(remote: AsyncRemote, resource: str) -> int | None:
    """Where to resume an interrupted upload; None when the server does not know it."""
    try:
        status = await remote.stubs().bytestream.QueryWriteStatus(
            bs_pb2.QueryWriteStatusRequest(resource_name=resource), metadata=remote.metadata,
            timeout=remote.policy.request_timeout)
    except grpc.RpcError:
        return None
    return status.committed_size


class _Counted(Verifier):
    """For a resumed write: counts from `offset`, never hashes (the server verifies the whole)."""

    __slots__ = ()

    def __init__(self, digest: Digest, offset: int) -> None:
        super().__init__(digest)
        self.received = offset

    def update(self, chunk: bytes | memoryview) -> None:
        self.received += len(chunk)

    def finish(self) -> None:
        return None


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
