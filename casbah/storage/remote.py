"""`remote`: every storage call forwarded to another REAPI server.

- existence: FindMissingBlobs in groups that fit a message (one digest function
  a request), run concurrently;
- small blobs: BatchReadBlobs / BatchUpdateBlobs sized by the remote's
  `max_batch_total_size_bytes` (a safe default when it does not say);
- large blobs: ByteStream in 1 MiB messages both ways, never whole in memory; a
  read that loses its connection, stalls, or ends short resumes from the offset
  already delivered;
- zstd on the wire when the remote advertises it (`compression: auto`);
- delete and iterate are not part of REAPI: they raise Unsupported.

Every blob read from the upstream is verified before it is passed on (unless the
node is `verify: false`): a batch hashes each blob, and one that fails is lost
alone (`BlobsLost`, DATA_LOSS for that blob); a stream hashes as it goes and
yields its last chunk only after the whole blob matched, so a lying upstream
never gets a complete wrong blob to a client with success, nor into a cache.
A ranged read fetches the whole blob to verify it and passes on only the range.

Unary calls and writes of blobs held in memory (`write_bytes`, `write_many`) are
retried on transient failures.  A streamed `write` is not: its source (a
client's upload) cannot be replayed, so it fails with the transient status
(UNAVAILABLE) and the client retries, as Bazel does.  Nothing partial is ever
stored: the remote only commits an upload once `finish_write` arrived and the
digest verified, and `finish_write` is sent only after the stream verified here.

`request-timeout` bounds each unary call, the wait for each message of a read,
and the time a write may go without the remote accepting data (a hung remote
cannot hold a request forever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import TypeVar

import grpc
from google.rpc import code_pb2
from pydantic import Field

from casbah import compression
from casbah.client.aio import AsyncRemote
from casbah.client.channel import RemoteSpec
from casbah.client.retry import RetryPolicy, transport_code
from casbah.config import ConfigError
from casbah.digest import Digest, DigestFunction, is_empty_blob
from casbah.errors import (
    BlobNotFound,
    CasbahError,
    DataLoss,
    DeadlineExceeded,
    DigestMismatch,
    InvalidArgument,
    Unavailable,
    Unsupported,
    code_from_int,
    from_status,
)
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.registry import KindOptions
from casbah.storage.base import (
    CHUNK_SIZE,
    BlobInfo,
    Storage,
    Verifier,
    check_range,
    found_or_lost,
    verified_range,
)
from casbah.storage.loader import NodeOptions, register

log = logging.getLogger(__name__)

FMB_GROUP = 10_000  # ~80 bytes a digest: well under any message limit
#: Protobuf bytes per blob in a batch (digest, status, framing), counted against the limit.
BLOB_OVERHEAD = 256
_PARALLEL = 8
T = TypeVar("T")


class RemoteStorage(Storage):
    kind = "remote"

    def __init__(self, remote: AsyncRemote, compression_mode: str = "auto", **kwargs) -> None:
        super().__init__(**kwargs)
        self.remote = remote
        self.compression_mode = compression_mode
        self._limit = asyncio.Semaphore(_PARALLEL)

    def describe(self) -> str:
        return f"remote({self.remote.describe()})"

    async def _zstd(self) -> bool:
        if self.compression_mode == "identity":
            return False
        return self.compression_mode == "zstd" or (await self.remote.capabilities()).zstd

    async def _bounded(self, coro):
        async with self._limit:
            return await coro

    def _what(self, verb: str, digest: Digest | None = None) -> str:
        return f"{verb}{' ' + str(digest) if digest else ''} on {self.remote.describe()}"

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        wanted = [d for d in digests if not is_empty_blob(d)]
        if not wanted:
            return []
        groups = [
            group[i : i + FMB_GROUP]
            for group in _by_function(wanted).values()
            for i in range(0, len(group), FMB_GROUP)
        ]
        results = await asyncio.gather(*(self._bounded(self._find_missing(g)) for g in groups))
        missing = {m for group in results for m in group}
        return [d for d in digests if d in missing]

    async def _find_missing(self, digests: Sequence[Digest]) -> set[Digest]:
        stubs = self.remote.stubs()
        function = digests[0].function
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.remote.instance, digest_function=function.proto_value,
            blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
        )
        response = await self.remote.unary(stubs.cas.FindMissingBlobs, request, "FindMissingBlobs")
        return {Digest(m.hash, m.size_bytes, function) for m in response.missing_blob_digests}

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        expected = check_range(digest, digest.size, offset, limit)
        if is_empty_blob(digest):
            return _Prefetched(None, _nothing())
        if self.verify and expected > 0:
            # The whole blob, whatever the range: only the whole can be verified (docs/architecture.md).
            zstd = await self._zstd()
            stream = verified_range(self._read_stream(digest, 0, 0, digest.size, zstd), self.read_verifier(digest),
                                    offset, expected)
        else:
            zstd = not limit and expected > 0 and await self._zstd()
            stream = self._read_stream(digest, offset, limit, expected, zstd)
        try:
            # NOT_FOUND (or the failure of every retry) surfaces here, before any data.
            first = await anext(stream)
        except StopAsyncIteration:
            first = None
        return _Prefetched(first, stream)

    async def _read_stream(self, digest: Digest, offset: int, limit: int, expected: int,
                           zstd: bool) -> AsyncIterator[bytes]:
        """ByteStream.Read that resumes from what it delivered after a transient failure,
        a stall (no message within request-timeout) or a stream that ends short."""
        stubs = self.remote.stubs()
        policy = self.remote.policy
        delivered = 0
        attempt = 0
        while True:
            request = bs_pb2.ReadRequest(
                resource_name=self.remote.blob_path(digest, zstd), read_offset=offset + delivered,
                read_limit=(limit - delivered) if limit else 0,
            )
            call = stubs.bytestream.Read(request, metadata=self.remote.metadata)
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
                    except InvalidArgument as exc:  # the upstream's zstd is corrupt: its data, not ours
                        raise DataLoss(f"{self._what('read', digest)}: {exc}") from None
                    if not data:
                        continue
                    if delivered + len(data) > expected:
                        raise DataLoss(f"{self._what('read', digest)}: the remote sent more than the "
                                       f"{expected} bytes asked for")
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
                raise BlobNotFound(digest, f"not on {self.remote.describe()}")
            if attempt >= policy.retries or not policy.retryable(code, idempotent=True):
                raise from_status(code, f"{self._what('read', digest)} at offset {offset + delivered}: "
                                        f"{code.name}: {details}")
            delay = policy.delay(attempt)
            log.info("%s: %s (%s) after %d bytes; resuming in %.2fs (retry %d/%d)", self._what("read", digest),
                     code.name, details, delivered, delay, attempt + 1, policy.retries)
            attempt += 1
            await asyncio.sleep(delay)

    async def read_bytes(self, digest: Digest) -> bytes:
        found = await self.read_many([digest])
        if digest not in found:
            raise BlobNotFound(digest, f"not on {self.remote.describe()}")
        return found[digest]

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {d: b"" for d in digests if is_empty_blob(d)}
        wanted = list(dict.fromkeys(d for d in digests if not is_empty_blob(d)))
        if not wanted:
            return found
        limit = (await self.remote.capabilities()).max_batch_size
        small = [d for d in wanted if d.size + BLOB_OVERHEAD <= limit]
        large = [d for d in wanted if d.size + BLOB_OVERHEAD > limit]
        lost: dict[Digest, CasbahError] = {}
        jobs = [self._bounded(self._batch_read(batch, lost)) for batch in _batches(small, limit, lambda d: d)]
        jobs += [self._bounded(self._read_large(d, lost)) for d in large]
        for result in await asyncio.gather(*jobs):
            found.update(result)
        return found_or_lost(found, lost)

    async def _batch_read(self, digests: list[Digest], lost: dict[Digest, CasbahError]) -> dict[Digest, bytes]:
        """One BatchReadBlobs; each blob is verified, and one that fails (or that the
        upstream itself reports DATA_LOSS for) goes to `lost`, not to the result."""
        stubs = self.remote.stubs()
        function = digests[0].function
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.remote.instance, digest_function=function.proto_value,
            digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
            acceptable_compressors=[re_pb2.Compressor.ZSTD] if await self._zstd() else [],
        )
        response = await self.remote.unary(stubs.cas.BatchReadBlobs, request, "BatchReadBlobs")
        found = {}
        for r in response.responses:
            if r.status.code == code_pb2.NOT_FOUND:
                continue
            digest = Digest(r.digest.hash, r.digest.size_bytes, function)
            what = self._what("BatchReadBlobs", digest)
            if r.status.code == code_pb2.DATA_LOSS:
                lost[digest] = DataLoss(f"{what}: {r.status.message}")
                continue
            if r.status.code != code_pb2.OK:
                raise from_status(code_from_int(r.status.code), f"{what}: {r.status.message}")
            try:
                data = r.data
                if r.compressor == re_pb2.Compressor.ZSTD:
                    data = compression.decompress(data, digest.size)
                if len(data) != digest.size:
                    raise DataLoss(f"{what}: got {len(data)} bytes")
                self.check_read(digest, data)
            except InvalidArgument as exc:  # corrupt zstd from the upstream
                lost[digest] = DataLoss(f"{what}: {exc}")
                continue
            except DataLoss as exc:
                lost[digest] = exc
                continue
            found[digest] = data
        return found

    async def _read_large(self, digest: Digest, lost: dict[Digest, CasbahError]) -> dict[Digest, bytes]:
        try:
            stream = await self.read(digest)
            return {digest: b"".join([c async for c in stream])}
        except BlobNotFound:
            return {}
        except DataLoss as exc:
            lost[digest] = exc
            return {}

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if is_empty_blob(digest):
            verifier = self.verifier(digest)
            async for chunk in chunks:
                verifier.update(chunk)
            verifier.finish()
            return
        try:
            await self._stream_write(digest, chunks)
        except grpc.RpcError as exc:
            code = transport_code(exc.code(), exc.details() or "")
            raise from_status(code, f"{self._what('write', digest)}: {code.name}: {exc.details()}") from None

    async def _stream_write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """One ByteStream.Write.  Raises grpc.RpcError (for the caller to retry or
        translate), DeadlineExceeded when the remote stops taking data, or whatever
        broke the source stream (DigestMismatch included)."""
        stubs = self.remote.stubs()
        timeout = self.remote.policy.request_timeout
        zstd = await self._zstd()
        resource = self.remote.upload_path(str(uuid.uuid4()), digest, zstd)
        verifier = self.verifier(digest)
        loop = asyncio.get_running_loop()
        failure: list[BaseException] = []
        #: When the remote last took a message; None while we wait for our own source.
        waiting_since: list[float | None] = [None]

        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            try:
                offset = 0
                pending: bytes | None = None
                source: AsyncIterator[bytes] = _verified(chunks, verifier)
                if zstd:
                    source = compression.compress_stream(source)
                async for chunk in _coalesce(source, CHUNK_SIZE):
                    if pending is not None:
                        waiting_since[0] = loop.time()
                        yield bs_pb2.WriteRequest(resource_name=resource, write_offset=offset, data=pending)
                        waiting_since[0] = None
                        offset += len(pending)
                    pending = chunk
                verifier.finish()  # a mismatch abandons the stream: finish_write is never sent
                waiting_since[0] = loop.time()
                yield bs_pb2.WriteRequest(resource_name=resource, write_offset=offset, data=pending or b"",
                                          finish_write=True)
            except (asyncio.CancelledError, GeneratorExit):
                raise
            except BaseException as exc:
                failure.append(exc)
                raise

        call = stubs.bytestream.Write(requests(), metadata=self.remote.metadata)
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
                raise DeadlineExceeded(f"{self._what('write', digest)}: the remote took no data for {timeout}s") \
                    from None
            if isinstance(exc, asyncio.CancelledError) and not _being_cancelled():
                raise Unavailable(f"{self._what('write', digest)}: the call was cancelled") from None
            raise
        finally:
            dog.cancel()
            call.cancel()
        if not zstd and response.committed_size not in (digest.size, -1):
            raise DigestMismatch(f"{self.remote.describe()} committed {response.committed_size} bytes of {digest}")

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results: list[Exception | None] = [None] * len(blobs)
        todo: list[int] = []
        for i, (digest, data) in enumerate(blobs):
            # Verified here, so a bad blob is never sent and fails alone.
            verifier = self.verifier(digest)
            try:
                verifier.update(data)
                verifier.finish()
            except DigestMismatch as exc:
                results[i] = exc
                continue
            if not is_empty_blob(digest):
                todo.append(i)
        if not todo:
            return results
        limit = (await self.remote.capabilities()).max_batch_size
        small = [i for i in todo if blobs[i][0].size + BLOB_OVERHEAD <= limit]
        large = [i for i in todo if blobs[i][0].size + BLOB_OVERHEAD > limit]

        async def batch(indexes: list[int]) -> None:
            try:
                errors = await self._batch_write([blobs[i] for i in indexes])
            except Exception as exc:
                errors = [exc] * len(indexes)
            for i, error in zip(indexes, errors, strict=True):
                results[i] = error

        async def single(i: int) -> None:
            digest, data = blobs[i]
            try:
                await self.remote.policy.call(lambda: self._stream_write(digest, _one(data)),
                                              self._what("write", digest))
            except Exception as exc:
                results[i] = exc

        await asyncio.gather(*(self._bounded(batch(b)) for b in _batches(small, limit, lambda i: blobs[i][0])),
                             *(self._bounded(single(i)) for i in large))
        return results

    async def _batch_write(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        stubs = self.remote.stubs()
        function = blobs[0][0].function
        request = re_pb2.BatchUpdateBlobsRequest(
            instance_name=self.remote.instance, digest_function=function.proto_value,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=re_pb2.Digest(hash=d.hash, size_bytes=d.size),
                                                             data=data) for d, data in blobs],
        )
        response = await self.remote.unary(stubs.cas.BatchUpdateBlobs, request, "BatchUpdateBlobs")
        status = {(r.digest.hash, r.digest.size_bytes): r.status for r in response.responses}
        errors: list[Exception | None] = []
        for digest, _ in blobs:
            s = status.get((digest.hash, digest.size))
            if s is None:
                errors.append(Unavailable(f"{self._what('BatchUpdateBlobs', digest)}: no status in the response"))
            elif s.code != code_pb2.OK:
                errors.append(from_status(code_from_int(s.code), f"{self._what('BatchUpdateBlobs', digest)}: "
                                                                 f"{s.message}"))
            else:
                errors.append(None)
        return errors

    # -- unsupported ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> int:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot delete: REAPI has no delete call")

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot list its blobs: REAPI has no such call")
        yield  # pragma: no cover

    async def close(self) -> None:
        await self.remote.close()


def _being_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _by_function(digests: Sequence[Digest]) -> dict[DigestFunction, list[Digest]]:
    """A REAPI request names one digest function: callers may mix them."""
    groups: dict[DigestFunction, list[Digest]] = {}
    for d in digests:
        groups.setdefault(d.function, []).append(d)
    return groups


def _batches(items: list[T], limit: int, digest_of: Callable[[T], Digest]) -> list[list[T]]:
    """Items grouped by digest function, then into batches whose sizes plus overhead fit `limit`."""
    batches: list[list[T]] = []
    by_fn: dict[DigestFunction, list[T]] = {}
    for item in items:
        by_fn.setdefault(digest_of(item).function, []).append(item)
    for group in by_fn.values():
        current: list[T] = []
        total = 0
        for item in group:
            cost = digest_of(item).size + BLOB_OVERHEAD
            if current and total + cost > limit:
                batches.append(current)
                current, total = [], 0
            current.append(item)
            total += cost
        if current:
            batches.append(current)
    return batches


class _Prefetched:
    """A read stream whose first chunk was fetched by `read()` (so NOT_FOUND is raised
    there); `aclose` always reaches the remote call, even if iteration never started."""

    __slots__ = ("_first", "_rest")

    def __init__(self, first: bytes | None, rest: AsyncIterator[bytes]) -> None:
        self._first = first
        self._rest = rest

    def __aiter__(self) -> _Prefetched:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await anext(self._rest)

    async def aclose(self) -> None:
        self._first = None
        close = getattr(self._rest, "aclose", None)
        if close is not None:
            with contextlib.suppress(RuntimeError):  # already running: its consumer closes it
                await close()


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield  # pragma: no cover


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _verified(chunks: AsyncIterable[bytes], verifier: Verifier) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        verifier.update(chunk)
        yield chunk


async def _coalesce(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Messages of exactly `size` bytes (the last one shorter): Bazel uploads in 16 KiB
    pieces, and one gRPC message per piece would cost far more than the copy."""
    buffer = bytearray()
    async for chunk in chunks:
        if not buffer and len(chunk) == size:
            yield bytes(chunk)
            continue
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)


class RemoteConnectionOptions(KindOptions):
    """How to reach an upstream: shared by the storage, ActionCache and asset-index `remote` kinds."""

    url: str
    instance: str = ""
    retries: int = Field(default=3, ge=0)
    max_backoff: float = Field(default=5.0, alias="max-backoff", gt=0)
    request_timeout: float = Field(default=60.0, alias="request-timeout", gt=0)
    channel_options: dict[str, int | str] = Field(default_factory=dict, alias="channel-options")
    server_cert: str | None = Field(default=None, alias="server-cert")
    client_key: str | None = Field(default=None, alias="client-key")
    client_cert: str | None = Field(default=None, alias="client-cert")
    token_file: str | None = Field(default=None, alias="token-file")


class RemoteOptions(RemoteConnectionOptions, NodeOptions):
    compression: str = Field(default="auto", pattern="^(auto|zstd|identity)$")


def remote_from_options(options: RemoteConnectionOptions, where: str = "remote") -> AsyncRemote:
    """Shared by the storage, ActionCache and asset-index `remote` kinds."""
    spec = RemoteSpec(url=options.url, instance=options.instance, server_cert=options.server_cert,
                      client_key=options.client_key, client_cert=options.client_cert,
                      token_file=options.token_file)
    try:
        spec.target()  # a malformed URL is a config error at startup, not at the first request
    except InvalidArgument as exc:
        raise ConfigError(f"{where}.url: {exc}") from None
    for key, file in (("server-cert", spec.server_cert), ("client-key", spec.client_key),
                      ("client-cert", spec.client_cert), ("token-file", spec.token_file)):
        if file is not None and not os.access(file, os.R_OK):
            raise ConfigError(f"{where}.{key}: cannot read {file}")
    if (spec.client_key is None) != (spec.client_cert is None):
        raise ConfigError(f"{where}: client-key and client-cert go together (mutual TLS)")
    policy = RetryPolicy(retries=options.retries, max_backoff=options.max_backoff,
                         request_timeout=options.request_timeout)
    return AsyncRemote(spec, policy, list(options.channel_options.items()))


@register("remote", RemoteOptions)
def _build(options: RemoteOptions, loader: object, path: str) -> RemoteStorage:
    return RemoteStorage(remote_from_options(options, path), options.compression, name=path, verify=options.verify)
