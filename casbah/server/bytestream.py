"""ByteStream: streamed reads and resumable, verified writes of CAS blobs.

A write that spans several messages runs as an *upload session*: a task that
streams into `Storage.write` from a small queue.  If the client's stream breaks
before `finish_write`, the session (and the storage write, with its temporary
file) stays alive for `SESSION_TTL` seconds, so the client can ask
QueryWriteStatus and resume from `committed_size` on a new stream, as Bazel does.
A one-message write skips the session and goes to storage in one call.

A session belongs to the newest stream writing it: a client that resumes while
its old stream is still alive on the server (it has not yet noticed the break)
takes the session over, and the old stream can neither feed, park nor close it.
Storage may end a write without reading it when the blob already exists (another
client stored it first); the upload then ends early, as REAPI allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from casbah import compression
from casbah.digest import is_empty_blob
from casbah.errors import Aborted, DeadlineExceeded, DigestMismatch, InvalidArgument, NotFound, OutOfRange, echo
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.server.base import ByteBudget, Instances, next_message, rpc
from casbah.server.resource_names import ResourceName, parse_read, parse_write
from casbah.server.wire import encode_read
from casbah.storage.base import Storage

log = logging.getLogger(__name__)

SESSION_TTL = 60.0
#: Blobs up to this size are gathered in memory and stored in one call, not streamed.
SMALL_UPLOAD = 1024 * 1024
_QUEUE_DEPTH = 8
_END = None


#: Bytes per ReadResponse.  gRPC takes a message off our hands long before the client
#: reads it (into its send buffer and the client's flow-control window), and each
#: message exists in a few copies on its way (the chunk, the encoded message, gRPC's);
#: smaller messages keep what a stalled reader pins near one storage chunk
#: (tests/server/test_stalled_readers.py), larger ones cost less CPU per MiB (measured:
#: 1.3-1.6 ms/MiB at 512 KiB against 1.65-1.75 at 256 KiB; buildbox-casd sends 2 MiB).
READ_MESSAGE = 512 * 1024


async def _send(context, message, idle: float, digest) -> None:
    """Write one response message; a client that takes nothing for `idle` seconds (its
    flow-control window stays full) is ended with DEADLINE_EXCEEDED, freeing the stream,
    the open file and the buffered chunk."""
    try:
        await asyncio.wait_for(context.write(message), idle)
    except TimeoutError:
        raise DeadlineExceeded(
            f"ByteStream.Read of {digest}: the client took nothing for {idle:.0f}s; closing the stalled stream"
        ) from None
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # gRPC refuses the write: the call is over (the client cancelled or left)
        raise asyncio.CancelledError(f"ByteStream.Read of {digest}: the client left") from exc


class AlreadyStored(Exception):
    """Storage ended the write without the rest of the data: the blob is already there."""


class _Gathering:
    """A small upload being gathered in memory by one stream."""

    __slots__ = ("parts", "received", "taken")

    def __init__(self, parts: list[bytes], received: int) -> None:
        self.parts = parts
        self.received = received
        self.taken = False  # handed to an UploadSession (a resume, or a broken stream)


class UploadSession:
    """One in-progress upload: a queue feeding a running `Storage.write`."""

    def __init__(self, key: tuple, resource: ResourceName, cas: Storage, sessions: dict, budget: ByteBudget,
                 preload: list[bytes] | None = None) -> None:
        self.key = key
        self.resource = resource
        self.committed = 0  # bytes accepted from the client (compressed bytes for compressed writes)
        self._sessions = sessions
        #: The server's upload budget: queued bytes count in it until storage takes them.
        self._budget = budget
        self._held = 0
        # `preload`: what a small upload had gathered before its stream broke (bounded by SMALL_UPLOAD).
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE_DEPTH + len(preload or ()))
        for part in preload or ():
            self._queue.put_nowait(part)
            self.committed += len(part)
            self._hold(len(part), force=True)
        self._expiry: asyncio.TimerHandle | None = None
        #: The stream that owns the session (see the module docstring).
        self.owner: object | None = None
        #: Held from the offset check to the end of the feed, so two streams of one
        #: upload never both append the bytes after the same committed offset.
        self.lock = asyncio.Lock()
        stream = self._drain()
        if resource.compressor:
            stream = compression.decompress_stream(stream, resource.digest.size)
        self.task = asyncio.get_running_loop().create_task(cas.write(resource.digest, stream))
        sessions[key] = self

    def _hold(self, n: int, force: bool = False) -> None:
        if force:
            self._budget.used += n
        else:
            self._budget.acquire(n, "ByteStream.Write")
        self._held += n

    def _unhold(self, n: int) -> None:
        n = min(n, self._held)
        self._held -= n
        self._budget.release(n)

    async def _drain(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not _END:
            self._unhold(len(chunk))  # storage holds it now (and bounds what it buffers)
            yield chunk

    def _check_task(self) -> None:
        """Raise what ended the storage write early (an error, or AlreadyStored)."""
        if self.task.done():
            self.task.result()  # raises what stopped the write
            raise AlreadyStored(str(self.resource.digest))

    async def feed(self, data: bytes | None) -> None:
        self._check_task()
        if data:
            self._hold(len(data))
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            put = asyncio.ensure_future(self._queue.put(data))
            try:
                await asyncio.wait((put, self.task), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not put.done():
                    put.cancel()
            if not put.done() or put.cancelled():  # the write ended first: the data was not queued
                if data:
                    self._unhold(len(data))
                self._check_task()
        if data:
            self.committed += len(data)

    async def finish(self) -> None:
        try:
            await self.feed(_END)
            await self.task
        finally:
            self.close()

    @property
    def parked(self) -> bool:
        return self._expiry is not None

    def park(self) -> None:
        """The client went away mid-upload: keep the session for a resume, for a while."""
        if self._sessions.get(self.key) is self and not self.task.done():
            self._expiry = asyncio.get_running_loop().call_later(SESSION_TTL, self.close)

    def resume(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def attach(self) -> object:
        """A stream starts (or resumes) writing: it becomes the owner; returns its token."""
        self.resume()
        self.owner = token = object()
        return token

    def close(self) -> None:
        self._unhold(self._held)  # what is still queued goes with the session
        self.resume()
        if self._sessions.get(self.key) is self:
            del self._sessions[self.key]
        if not self.task.done():
            self.task.cancel()


class ByteStreamService(bs_grpc.ByteStreamServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances
        self.sessions: dict[tuple, UploadSession] = {}
        #: Small uploads being gathered in memory (see `_small_write`).
        self.gathering: dict[tuple, _Gathering] = {}

    @rpc
    async def Read(self, request, context) -> None:
        """Written with `context.write`, each write awaited, so a reader that takes nothing
        stops the reading (the storage stream is pulled one chunk at a time) and is ended
        after `limits.idle-timeout` (see `_send`)."""
        resource = parse_read(request.resource_name)
        reader = self.instances.get(resource.instance, "bytestream", context, what="ByteStream.Read",
                                    detail=str(resource.digest))
        reader.check_function(resource.digest.function)
        cas = reader.cas
        digest = resource.digest
        if request.read_limit < 0:
            raise InvalidArgument(f"read_limit {request.read_limit} is negative")
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise OutOfRange(f"read_offset {request.read_offset} is outside blob {digest}")
        if resource.compressor and request.read_limit:
            raise InvalidArgument("read_limit must be 0 for compressed reads")
        idle = self.instances.limits.idle_timeout
        if is_empty_blob(digest):
            if resource.compressor:
                await _send(context, bs_pb2.ReadResponse(data=compression.compress(b"")), idle, digest)
            return
        stream = await cas.read(digest, request.read_offset, request.read_limit)
        if resource.compressor:
            stream = compression.compress_stream(stream)
        try:
            async for chunk in stream:
                if not chunk:
                    continue
                if len(chunk) <= READ_MESSAGE:
                    await _send(context, encode_read(chunk), idle, digest)
                    continue
                view = memoryview(chunk)  # slices of a view: the encoding is the one copy
                for start in range(0, len(chunk), READ_MESSAGE):
                    await _send(context, encode_read(view[start:start + READ_MESSAGE]), idle, digest)
        finally:
            close = getattr(stream, "aclose", None)
            if close is not None:
                await close()

    @rpc
    async def Write(self, request_iterator, context):
        idle = self.instances.limits.idle_timeout
        first = await next_message(request_iterator, idle, "ByteStream.Write")
        if first is None:
            raise InvalidArgument("Write stream carried no request")
        name = first.resource_name
        resource = parse_write(name)
        instance = self.instances.get(resource.instance, "bytestream", context, write=True, what="ByteStream.Write",
                                      detail=str(resource.digest))
        instance.check_function(resource.digest.function)
        instance.check_writable("ByteStream.Write")
        digest = resource.digest
        key = (resource.instance, resource.upload_id, digest, resource.compressor)
        session = self.sessions.get(key)
        gathering = self.gathering.get(key)
        if session is None and gathering is not None and first.write_offset > 0 and not gathering.taken:
            # A resume while the small upload's first stream is still open: take over its bytes.
            gathering.taken = True
            session = UploadSession(key, resource, instance.cas, self.sessions, self.instances.uploads,
                                    preload=[p for p in gathering.parts if p])
        if session is None:
            if is_empty_blob(digest) or await instance.cas.has(digest):
                # Early return: the blob is there.  -1 for compressed writes (REAPI).
                return bs_pb2.WriteResponse(committed_size=-1 if resource.compressor else digest.size)
            if first.write_offset != 0:
                raise InvalidArgument(f"no upload in progress for {echo(name)}: write_offset must be 0")
            if first.finish_write:
                data = first.data
                if resource.compressor:
                    data = compression.decompress(data, digest.size)
                await instance.cas.write_bytes(digest, data)
                return bs_pb2.WriteResponse(committed_size=len(first.data))
            if digest.size <= SMALL_UPLOAD and not resource.compressor:
                return await self._small_write(instance, resource, first, request_iterator, idle)
            session = UploadSession(key, resource, instance.cas, self.sessions, self.instances.uploads)
        elif first.write_offset == 0 and not session.parked:
            # Another live stream is writing under this very name: a client that reuses
            # one upload UUID for concurrent uploads of the same blob (BuildStream 1.6's
            # forked pushers do).  Not a resume: write independently; the store keeps one.
            session = UploadSession((*key, object()), resource, instance.cas, self.sessions, self.instances.uploads)
        token = session.attach()
        try:
            request = first
            while True:
                if request is not first and request.resource_name and request.resource_name != name:
                    raise InvalidArgument("resource_name changed in the middle of a Write stream")
                async with session.lock:
                    if session.owner is not token:
                        raise Aborted(f"upload {echo(name)} was resumed on another stream")
                    await self._accept(session, request)
                    if request.finish_write:
                        await session.finish()
                        return bs_pb2.WriteResponse(committed_size=session.committed)
                request = await next_message(request_iterator, idle, f"ByteStream.Write {name}")
                if request is None:
                    if session.owner is token:
                        session.park()
                    raise InvalidArgument(
                        f"Write stream for {echo(name)} ended before finish_write at {session.committed} bytes"
                    )
        except AlreadyStored:
            session.close()
            # Early return: another upload stored the blob meanwhile.  -1 for compressed writes (REAPI).
            return bs_pb2.WriteResponse(committed_size=-1 if resource.compressor else digest.size)
        except asyncio.CancelledError:
            if session.owner is token:
                session.park()
            raise
        except BaseException:
            if session.owner is token and not session.parked:
                session.close()
            raise

    async def _small_write(self, instance, resource: ResourceName, first, requests, idle: float):
        """A small blob in several messages (Bazel sends 16 KiB ones): gather it, store it
        in one call.  At most SMALL_UPLOAD bytes are held, and no session, queue or task
        is set up.  Resumes still work: a broken stream leaves its bytes as a parked
        session, and a resume arriving while this stream is open takes them over."""
        digest = resource.digest
        parts = [first.data]
        received = len(first.data)
        key = (resource.instance, resource.upload_id, digest, resource.compressor)
        progress = _Gathering(parts, received)  # what QueryWriteStatus reports while the stream is open
        self.gathering[key] = progress
        budget = self.instances.uploads
        budget.acquire(digest.size, "ByteStream.Write")  # what this stream may gather, at most
        try:
            return await self._gather(instance, resource, first, requests, idle, progress)
        finally:
            budget.release(digest.size)
            if self.gathering.get(key) is progress:
                del self.gathering[key]

    async def _gather(self, instance, resource: ResourceName, first, requests, idle: float,
                      progress: _Gathering):
        digest = resource.digest
        parts = progress.parts
        received = progress.received
        request = first
        while not request.finish_write:
            try:
                request = await next_message(requests, idle, f"ByteStream.Write {first.resource_name}")
            except asyncio.CancelledError:
                self._park_partial(instance, resource, progress)
                raise
            if progress.taken:
                raise Aborted(f"upload {echo(first.resource_name)} was resumed on another stream")
            if request is None:
                self._park_partial(instance, resource, progress)
                raise InvalidArgument(
                    f"Write stream for {echo(first.resource_name)} ended before finish_write at {received} bytes"
                )
            if request.resource_name and request.resource_name != first.resource_name:
                raise InvalidArgument("resource_name changed in the middle of a Write stream")
            if request.write_offset != received:
                raise InvalidArgument(f"write_offset {request.write_offset} does not follow the {received} bytes sent")
            received += len(request.data)
            if received > digest.size:
                raise DigestMismatch(f"upload for {digest} has more than the {digest.size} bytes its digest names")
            parts.append(request.data)
            progress.received = received
        await instance.cas.write_bytes(digest, b"".join(parts))
        return bs_pb2.WriteResponse(committed_size=received)

    def _park_partial(self, instance, resource: ResourceName, progress: _Gathering) -> None:
        """The stream broke: keep what arrived as a parked session, so the client can ask
        QueryWriteStatus and resume, exactly as for a large upload."""
        key = (resource.instance, resource.upload_id, resource.digest, resource.compressor)
        if not progress.taken and key not in self.sessions:
            progress.taken = True
            UploadSession(key, resource, instance.cas, self.sessions, self.instances.uploads,
                          preload=[p for p in progress.parts if p]).park()

    async def _accept(self, session: UploadSession, request) -> None:
        offset = request.write_offset
        if offset > session.committed:
            raise InvalidArgument(
                f"write_offset {offset} is past the {session.committed} bytes committed for this upload"
            )
        data = request.data
        if offset < session.committed:  # a resume that repeats bytes we have
            data = data[session.committed - offset :]
        if data:
            await session.feed(data)

    @rpc
    async def QueryWriteStatus(self, request, context):
        resource = parse_write(request.resource_name)
        instance = self.instances.get(resource.instance, "bytestream", context, what="QueryWriteStatus")
        instance.check_function(resource.digest.function)
        key = (resource.instance, resource.upload_id, resource.digest, resource.compressor)
        gathered = self.gathering.get(key)
        if gathered is not None and not gathered.taken:
            return bs_pb2.QueryWriteStatusResponse(committed_size=gathered.received, complete=False)
        session = self.sessions.get(key)
        if session is not None and not session.task.done():
            return bs_pb2.QueryWriteStatusResponse(committed_size=session.committed, complete=False)
        if is_empty_blob(resource.digest) or await instance.cas.has(resource.digest):
            return bs_pb2.QueryWriteStatusResponse(committed_size=resource.digest.size, complete=True)
        if session is not None:  # its write failed: the client learns why when it resumes
            return bs_pb2.QueryWriteStatusResponse(committed_size=session.committed, complete=False)
        raise NotFound(f"no upload in progress for {echo(request.resource_name)}")

    async def close(self) -> None:
        for session in list(self.sessions.values()):
            session.close()
            with contextlib.suppress(BaseException):
                await session.task
