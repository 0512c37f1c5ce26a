"""`remote`: every storage call forwarded to another REAPI server.

- existence: FindMissingBlobs in groups that fit a message, run concurrently;
- small blobs: BatchReadBlobs / BatchUpdateBlobs sized by the remote's
  `max_batch_total_size_bytes` (a safe default when it does not say);
- large blobs: ByteStream in 1 MiB chunks both ways, never whole in memory; a read
  that loses its connection resumes from the offset already delivered;
- zstd on the wire when the remote advertises it (`compression: auto`);
- delete and iterate are not part of REAPI: they raise Unsupported.

Writes are verified here too, before the final `finish_write` is sent, so a
mismatching stream is abandoned instead of being offered to the remote.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Sequence

import grpc
from google.rpc import code_pb2
from pydantic import Field

from casbah import compression
from casbah.client.aio import AsyncRemote
from casbah.client.remote import RemoteSpec
from casbah.client.retry import RetryPolicy
from casbah.digest import Digest
from casbah.errors import BlobNotFound, DeadlineExceeded, DigestMismatch, Unsupported, from_status
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, Verifier
from casbah.storage.loader import NodeOptions, register

FMB_GROUP = 10_000  # ~80 bytes a digest: well under any message limit
_PARALLEL = 8


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

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        if not digests:
            return []
        groups = [digests[i : i + FMB_GROUP] for i in range(0, len(digests), FMB_GROUP)]
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
        stream = self._read_stream(digest, offset, limit, await self._zstd() and not limit)
        try:
            # The first chunk (or NOT_FOUND) must come back within the call timeout;
            # later chunks may take as long as the blob takes.
            first = await asyncio.wait_for(anext(stream), self.remote.policy.request_timeout)
        except StopAsyncIteration:
            return _chain(b"", stream)
        except TimeoutError:
            await stream.aclose()
            raise DeadlineExceeded(
                f"read {digest}: {self.remote.describe()} sent nothing in {self.remote.policy.request_timeout}s"
            ) from None
        return _chain(first, stream)

    async def _read_stream(self, digest: Digest, offset: int, limit: int, zstd: bool) -> AsyncIterator[bytes]:
        """ByteStream.Read that resumes after a transient failure from what it delivered."""
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
            decompressor = compression.Decompressor(digest.size - offset - delivered) if zstd else None
            try:
                async for response in call:
                    data = decompressor.feed(response.data) if decompressor else response.data
                    if data:
                        delivered += len(data)
                        attempt = 0
                        yield data
                return
            except grpc.RpcError as exc:
                code = exc.code()
                if attempt >= policy.retries or not policy.retryable(code, idempotent=True):
                    raise from_status(code, f"read {digest} from {self.remote.describe()}: {exc.details()}") from None
                await asyncio.sleep(policy.delay(attempt))
                attempt += 1
            finally:
                call.cancel()

    async def read_bytes(self, digest: Digest) -> bytes:
        found = await self.read_many([digest])
        if digest not in found:
            raise BlobNotFound(digest, f"not on {self.remote.describe()}")
        return found[digest]

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        caps = await self.remote.capabilities()
        small, large = _split(digests, caps.max_batch_size)
        found: dict[Digest, bytes] = {}
        jobs = [self._bounded(self._batch_read(batch)) for batch in _batches(small, caps.max_batch_size)]
        jobs += [self._bounded(self._read_large(d)) for d in large]
        for result in await asyncio.gather(*jobs):
            found.update(result)
        return found

    async def _batch_read(self, digests: list[Digest]) -> dict[Digest, bytes]:
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
            if r.status.code != code_pb2.OK:
                raise from_status(grpc.StatusCode(_code(r.status.code)), f"BatchReadBlobs {digest}: {r.status.message}")
            data = r.data
            if r.compressor == re_pb2.Compressor.ZSTD:
                data = compression.decompress(data, digest.size)
            found[digest] = data
        return found

    async def _read_large(self, digest: Digest) -> dict[Digest, bytes]:
        try:
            stream = await self.read(digest)
            return {digest: b"".join([c async for c in stream])}
        except BlobNotFound:
            return {}

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self._stream_write(digest, chunks, retry=False)

    async def _stream_write(self, digest: Digest, chunks: AsyncIterable[bytes], retry: bool) -> None:
        stubs = self.remote.stubs()
        zstd = await self._zstd()
        resource = self.remote.upload_path(str(uuid.uuid4()), digest, zstd)
        verifier = Verifier(digest)

        async def requests() -> AsyncIterator[bs_pb2.WriteRequest]:
            offset = 0
            pending: bytes | None = None
            source = compression.compress_stream(_verified(chunks, verifier)) if zstd else _verified(chunks, verifier)
            async for chunk in _rechunk(source):
                if pending is not None:
                    yield bs_pb2.WriteRequest(resource_name=resource, write_offset=offset, data=pending)
                    offset += len(pending)
                pending = chunk
            verifier.finish()  # a mismatch abandons the stream: finish_write is never sent
            yield bs_pb2.WriteRequest(resource_name=resource, write_offset=offset, data=pending or b"",
                                      finish_write=True)

        try:
            response = await stubs.bytestream.Write(requests(), metadata=self.remote.metadata)
        except grpc.RpcError as exc:
            raise from_status(exc.code(), f"write {digest} to {self.remote.describe()}: {exc.details()}") from None
        if not zstd and response.committed_size not in (digest.size, -1):
            raise DigestMismatch(f"{self.remote.describe()} committed {response.committed_size} bytes of {digest}")

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        caps = await self.remote.capabilities()
        results: list[Exception | None] = [None] * len(blobs)
        small = [i for i, (d, _) in enumerate(blobs) if d.size <= caps.max_batch_size - 1024]
        large = [i for i, (d, _) in enumerate(blobs) if d.size > caps.max_batch_size - 1024]
        batches: list[list[int]] = []
        total = 0
        for i in small:
            size = blobs[i][0].size + 128
            if not batches or total + size > caps.max_batch_size:
                batches.append([])
                total = 0
            batches[-1].append(i)
            total += size

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
                await self.remote.policy.call(lambda: self._stream_write(digest, _one(data), True),
                                              f"write {digest}")
            except Exception as exc:
                results[i] = exc

        await asyncio.gather(*(self._bounded(batch(b)) for b in batches), *(self._bounded(single(i)) for i in large))
        return results

    async def _batch_write(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        stubs = self.remote.stubs()
        function = blobs[0][0].function
        errors: list[Exception | None] = []
        requests = []
        for digest, data in blobs:
            verifier = Verifier(digest)
            try:
                verifier.update(data)
                verifier.finish()
            except DigestMismatch as exc:
                errors.append(exc)
                continue
            errors.append(None)
            requests.append(re_pb2.BatchUpdateBlobsRequest.Request(
                digest=re_pb2.Digest(hash=digest.hash, size_bytes=digest.size), data=data))
        if requests:
            request = re_pb2.BatchUpdateBlobsRequest(
                instance_name=self.remote.instance, requests=requests, digest_function=function.proto_value
            )
            response = await self.remote.unary(stubs.cas.BatchUpdateBlobs, request, "BatchUpdateBlobs")
            status = {(r.digest.hash, r.digest.size_bytes): r.status for r in response.responses}
            for i, (digest, _) in enumerate(blobs):
                s = status.get((digest.hash, digest.size))
                if errors[i] is None and s is not None and s.code != code_pb2.OK:
                    errors[i] = from_status(grpc.StatusCode(_code(s.code)), f"BatchUpdateBlobs {digest}: {s.message}")
        return errors

    # -- unsupported ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> int:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot delete: REAPI has no delete call")

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        raise Unsupported(f"remote storage {self.remote.describe()} cannot list its blobs: REAPI has no such call")
        yield  # pragma: no cover

    async def close(self) -> None:
        await self.remote.close()


def _code(value: int) -> tuple:
    return next(c.value for c in grpc.StatusCode if c.value[0] == value)


def _split(digests: Sequence[Digest], limit: int) -> tuple[list[Digest], list[Digest]]:
    small = [d for d in digests if d.size <= limit - 1024]
    large = [d for d in digests if d.size > limit - 1024]
    return small, large


def _batches(digests: list[Digest], limit: int) -> list[list[Digest]]:
    batches: list[list[Digest]] = []
    total = 0
    for d in digests:
        size = d.size + 128
        if not batches or total + size > limit:
            batches.append([])
            total = 0
        batches[-1].append(d)
        total += size
    return batches


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _verified(chunks: AsyncIterable[bytes], verifier: Verifier) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        verifier.update(chunk)
        yield chunk


async def _rechunk(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """Split chunks larger than CHUNK_SIZE: a gRPC message must stay under the limit."""
    async for chunk in chunks:
        for i in range(0, len(chunk), CHUNK_SIZE):
            yield chunk[i : i + CHUNK_SIZE]


class RemoteOptions(NodeOptions):
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
    compression: str = Field(default="auto", pattern="^(auto|zstd|identity)$")


def remote_from_options(options: RemoteOptions) -> AsyncRemote:
    """Shared by the storage, ActionCache and asset-index `remote` kinds."""
    spec = RemoteSpec(url=options.url, instance=options.instance, server_cert=options.server_cert,
                      client_key=options.client_key, client_cert=options.client_cert,
                      token_file=options.token_file)
    policy = RetryPolicy(retries=options.retries, max_backoff=options.max_backoff,
                         request_timeout=options.request_timeout)
    return AsyncRemote(spec, policy, list(options.channel_options.items()))


@register("remote", RemoteOptions)
def _build(options: RemoteOptions, loader: object, path: str) -> RemoteStorage:
    return RemoteStorage(remote_from_options(options), options.compression, name=path, verify=options.verify)
