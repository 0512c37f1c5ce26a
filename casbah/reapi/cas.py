"""The one CAS client: every caller that reads or writes a REAPI server's CAS goes here.

- existence: FindMissingBlobs in groups that fit a message (one digest function a
  request), run concurrently;
- small blobs: BatchReadBlobs / BatchUpdateBlobs packed against the server's
  `max_batch_total_size_bytes` (`plan`); large ones over ByteStream
  (`reapi.bytestream`: resumable reads, resumable writes from replayable sources);
- zstd on the wire when the server advertises it (`compression="auto"`);
- every blob read is verified (`verify=True`): a batch blob that fails is lost
  alone (DATA_LOSS for it), a stream hashes as it goes and yields its last chunk
  only after the whole blob matched;
- a server that answers UNIMPLEMENTED or PERMISSION_DENIED to BatchReadBlobs or
  BatchUpdateBlobs (some proxies and read-through caches have no batches, some
  refuse them by policy) gets every blob over ByteStream instead; this is learnt
  once per connection and per direction, so only the first batch pays the probe;
- GetTree, Remote Asset and ReferenceStorage calls (`reapi.names`), where a miss
  raises the NotFound family.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence

import grpc
from google.rpc import code_pb2

from casbah import compression
from casbah.digest import Digest, is_empty_blob
from casbah.errors import (
    BlobNotFound,
    CasbahError,
    DataLoss,
    DigestMismatch,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    Unsupported,
    code_from_int,
    from_status,
)
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.reapi import bytestream, plan
from casbah.reapi.connection import AsyncRemote, RemoteCapabilities
from casbah.reapi.names import NameCalls
from casbah.reapi.retry import transport_code
from casbah.reapi.wire import encode_batch_update
from casbah.streams import NoVerifier, ReadVerifier, Verifier, empty_stream, one_chunk, verified_range

log = logging.getLogger(__name__)

#: Requests in flight at once per client.
PARALLEL = 8


class CasClient(NameCalls):
    """CAS calls (and, from `NameCalls`, GetTree, Remote Asset and ReferenceStorage) on
    one connection.  `source` arguments name the server in DATA_LOSS messages."""

    def __init__(self, remote: AsyncRemote, compression_mode: str = "auto", parallel: int = PARALLEL) -> None:
        self.remote = remote
        self.compression_mode = compression_mode
        self._limit = asyncio.Semaphore(parallel)
        self._raw_update: Callable | None = None
        #: Whether the server takes batch calls; False once it answered one with
        #: UNIMPLEMENTED or PERMISSION_DENIED (then ByteStream carries every blob).
        self.batch_read = True
        self.batch_update = True

    def describe(self) -> str:
        return self.remote.describe()

    async def capabilities(self) -> RemoteCapabilities:
        return await self.remote.capabilities()

    async def batch_limit(self) -> int:
        return (await self.remote.capabilities()).max_batch_size

    async def zstd(self) -> bool:
        if self.compression_mode == "identity":
            return False
        return self.compression_mode == "zstd" or (await self.remote.capabilities()).zstd

    async def bounded(self, coro):
        async with self._limit:
            return await coro

    def _what(self, verb: str, digest: Digest) -> str:
        return f"{verb} {digest} on {self.remote.describe()}"

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The absent ones, in order (the empty blob is never missing)."""
        wanted = list(dict.fromkeys(d for d in digests if not is_empty_blob(d)))
        if not wanted:
            return []
        groups = plan.find_missing_groups(wanted)
        results = await asyncio.gather(*(self.bounded(self._find_missing(g)) for g in groups))
        missing = {m for group in results for m in group}
        return [d for d in digests if d in missing]

    async def _find_missing(self, digests: Sequence[Digest]) -> set[Digest]:
        function = digests[0].function
        request = re_pb2.FindMissingBlobsRequest(
            instance_name=self.remote.instance, digest_function=function.proto_value,
            blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
        )
        response = await self.remote.unary(self.remote.stubs().cas.FindMissingBlobs, request, "FindMissingBlobs")
        return {Digest(m.hash, m.size_bytes, function) for m in response.missing_blob_digests}

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0, expected: int | None = None,
                   verifier: Verifier | None = None) -> AsyncIterator[bytes]:
        """A ByteStream read of `expected` bytes (the whole blob from `offset` by default).
        With a `verifier`, the whole blob is read and hashed, and only the range passed on.
        Raises BlobNotFound before any data."""
        if expected is None:
            expected = digest.size - offset if not limit else min(limit, digest.size - offset)
        if is_empty_blob(digest):
            return Prefetched(None, empty_stream())
        if verifier is not None and expected > 0:
            zstd = await self.zstd()
            stream = verified_range(bytestream.read_stream(self.remote, digest, 0, 0, digest.size, zstd),
                                    verifier, offset, expected)
        else:
            zstd = not limit and expected > 0 and await self.zstd()
            stream = bytestream.read_stream(self.remote, digest, offset, limit, expected, zstd)
        try:
            first = await anext(stream)  # NOT_FOUND (or every retry failing) surfaces here
        except StopAsyncIteration:
            first = None
        return Prefetched(first, stream)

    async def read_many(self, digests: Sequence[Digest], verify: bool = True,
                        source: str | None = None) -> tuple[dict[Digest, bytes], dict[Digest, CasbahError]]:
        """(found, lost): small blobs by batch, larger ones by stream; absent ones are left
        out of both; a blob that fails verification (or the server reports lost) is in `lost`."""
        found: dict[Digest, bytes] = {d: b"" for d in digests if is_empty_blob(d)}
        wanted = list(dict.fromkeys(d for d in digests if not is_empty_blob(d)))
        lost: dict[Digest, CasbahError] = {}
        if not wanted:
            return found, lost
        limit = await self.batch_limit()
        small, large = plan.split_by_size(wanted, limit, _itself)
        batches = plan.pack_batches(small, limit, _itself)
        jobs = [self.bounded(self.read_batch(b, verify, lost, source)) for b in batches]
        jobs += [self.bounded(self._read_large(d, verify, lost, source)) for d in large]
        for result in await asyncio.gather(*jobs):
            found.update(result)
        return found, lost

    async def read_batch(self, digests: list[Digest], verify: bool, lost: dict[Digest, CasbahError],
                         source: str | None = None) -> dict[Digest, bytes]:
        """One BatchReadBlobs (one digest function); each blob verified.  Over ByteStream,
        blob by blob, on a server that has no (or refuses) batch reads."""
        if not self.batch_read:
            return await self._read_by_stream(digests, verify, lost, source)
        function = digests[0].function
        request = re_pb2.BatchReadBlobsRequest(
            instance_name=self.remote.instance, digest_function=function.proto_value,
            digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in digests],
            acceptable_compressors=[re_pb2.Compressor.ZSTD] if await self.zstd() else [],
        )
        try:
            response = await self.remote.unary(self.remote.stubs().cas.BatchReadBlobs, request, "BatchReadBlobs")
        except (Unsupported, PermissionDenied) as exc:
            self.batch_read = self._no_batches("BatchReadBlobs", exc)
            return await self._read_by_stream(digests, verify, lost, source)
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
                if verify:
                    verifier = ReadVerifier(digest, source or self.describe())
                    verifier.update(data)
                    verifier.finish()
            except InvalidArgument as exc:  # corrupt zstd from the server
                lost[digest] = DataLoss(f"{what}: {exc}")
                continue
            except DataLoss as exc:
                lost[digest] = exc
                continue
            found[digest] = data
        return found

    async def _read_by_stream(self, digests: list[Digest], verify: bool, lost: dict[Digest, CasbahError],
                              source: str | None) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}
        for result in await asyncio.gather(*(self._read_large(d, verify, lost, source) for d in digests)):
            found.update(result)
        return found

    def _no_batches(self, method: str, exc: CasbahError) -> bool:
        """Note that the server refuses `method`; ByteStream from now on (False, to store)."""
        log.warning("%s answers %s to %s (%s): using ByteStream for every blob on this connection",
                    self.describe(), exc.code.name, method, exc)
        return False

    async def _read_large(self, digest: Digest, verify: bool, lost: dict[Digest, CasbahError],
                          source: str | None) -> dict[Digest, bytes]:
        verifier = ReadVerifier(digest, source or self.describe()) if verify else None
        try:
            stream = await self.read(digest, verifier=verifier)
            return {digest: b"".join([c async for c in stream])}
        except BlobNotFound:
            return {}
        except DataLoss as exc:
            lost[digest] = exc
            return {}

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes], verifier: Verifier | None = None) -> None:
        """Upload a one-shot stream (not retried: it cannot be replayed)."""
        verifier = verifier or Verifier(digest)
        if is_empty_blob(digest):
            async for chunk in chunks:
                verifier.update(chunk)
            verifier.finish()
            return
        try:
            await bytestream.write_stream(self.remote, digest, chunks, verifier, await self.zstd())
        except grpc.RpcError as exc:
            code = transport_code(exc.code(), exc.details() or "")
            raise from_status(code, f"{self._what('write', digest)}: {code.name}: {exc.details()}") from None

    async def write_reopenable(self, digest: Digest, reopen: bytestream.Reopen) -> None:
        """Upload from a replayable source over ByteStream, resuming after transient failures."""
        await bytestream.write_resumable(self.remote, digest, reopen, lambda: Verifier(digest), await self.zstd())

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]], verify: bool = True) -> list[Exception | None]:
        """Blobs in memory: one result per blob (None = stored), never raising for one bad
        blob.  Each is verified first, so a bad blob is never sent and fails alone."""
        results: list[Exception | None] = [None] * len(blobs)
        todo: list[int] = []
        for i, (digest, data) in enumerate(blobs):
            verifier = Verifier(digest) if verify else NoVerifier(digest)
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
        limit = await self.batch_limit()
        small, large = plan.split_by_size(todo, limit, lambda i: blobs[i][0])

        async def batch(indexes: list[int]) -> None:
            try:
                errors = await self.update_batch([blobs[i] for i in indexes])
            except Exception as exc:
                errors = [exc] * len(indexes)
            for i, error in zip(indexes, errors, strict=True):
                results[i] = error

        async def single(i: int) -> None:
            digest, data = blobs[i]
            try:
                await self.write_reopenable(digest, lambda offset: one_chunk(data[offset:]))
            except Exception as exc:
                results[i] = exc

        await asyncio.gather(*(self.bounded(batch(b)) for b in plan.pack_batches(small, limit, lambda i: blobs[i][0])),
                             *(self.bounded(single(i)) for i in large))
        return results

    async def update_batch(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        """One BatchUpdateBlobs (one digest function); an error per blob or None.  Over
        ByteStream, blob by blob, on a server that has no (or refuses) batch updates."""
        if not self.batch_update:
            return await self._update_by_stream(blobs)
        if self._raw_update is None:
            # The request goes out already in wire form (`wire.encode_batch_update`).
            self._raw_update = self.remote.channel.unary_unary(
                "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
                request_serializer=None, response_deserializer=re_pb2.BatchUpdateBlobsResponse.FromString)
        request = encode_batch_update(self.remote.instance, blobs[0][0].function.proto_value, blobs)
        try:
            response = await self.remote.unary(self._raw_update, request, "BatchUpdateBlobs")
        except (Unsupported, PermissionDenied) as exc:
            self.batch_update = self._no_batches("BatchUpdateBlobs", exc)
            return await self._update_by_stream(blobs)
        status = {(r.digest.hash, r.digest.size_bytes): r.status for r in response.responses}
        errors: list[Exception | None] = []
        for digest, _ in blobs:
            s = status.get((digest.hash, digest.size))
            what = self._what("BatchUpdateBlobs", digest)
            if s is None:
                errors.append(Unavailable(f"{what}: no status in the response"))
            elif s.code != code_pb2.OK:
                errors.append(from_status(code_from_int(s.code), f"{what}: {s.message}"))
            else:
                errors.append(None)
        return errors

    async def check_writable(self) -> None:
        """Raise PermissionDenied, before anything is uploaded, when the server will refuse
        uploads.  ReferenceStorage's Status (`allow_updates`) answers for the instance where
        it is served; then the empty blob is written over ByteStream, which stores nothing
        (every server has it) but is refused for a read-only instance or a read-only
        credential, which Status does not know about.  (Capabilities' `update_enabled` is
        not used: it is about the ActionCache, and a writable CAS without one says false.)
        Anything inconclusive (no ByteStream, the server down) is left for the upload."""
        where = self.describe()
        try:
            if not await self.reference_status():
                raise PermissionDenied(f"{where} does not accept updates (ReferenceStorage Status: allow_updates "
                                       "is false, e.g. a read-only instance)")
        except Unsupported:
            pass
        empty = Digest.of(b"")
        try:
            await bytestream.write_stream(self.remote, empty, empty_stream(), Verifier(empty), False)
        except grpc.RpcError as exc:
            code = transport_code(exc.code(), exc.details() or "")
            if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise from_status(code, f"{where} does not accept uploads: {exc.details()}") from None
        except CasbahError:
            pass

    async def _update_by_stream(self, blobs: list[tuple[Digest, bytes]]) -> list[Exception | None]:
        async def one(digest: Digest, data: bytes) -> Exception | None:
            try:
                await self.write_reopenable(digest, lambda offset: one_chunk(data[offset:]))
            except CasbahError as exc:
                return exc
            return None

        return list(await asyncio.gather(*(one(d, b) for d, b in blobs)))

    async def close(self) -> None:
        await self.remote.close()


class Prefetched:
    """A read stream whose first chunk was fetched by `read()` (so NOT_FOUND is raised
    there); `aclose` always reaches the remote call, even if iteration never started."""

    __slots__ = ("_first", "_rest")

    def __init__(self, first: bytes | None, rest: AsyncIterator[bytes]) -> None:
        self._first = first
        self._rest = rest

    def __aiter__(self) -> Prefetched:
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


def _itself(digest: Digest) -> Digest:
    return digest
