"""Chunked transfers of large blobs (SplitBlob / SpliceBlob), on the client side.

When the server advertises `splice_blob_support` with FastCDC 2020 parameters, a blob
larger than twice the maximum chunk (the REAPI: blobs smaller than the maximum SHOULD
go whole) is uploaded as its chunks: chunked locally with the server's parameters
(so both sides cut at the same places), FindMissingBlobs on the chunks, only the
missing ones sent, then SpliceBlob.  A similar blob uploaded earlier shares most
chunks, so only the changed region travels.

When it advertises `split_blob_support`, a large blob is downloaded as its chunks:
SplitBlob, then only the chunks the local side lacks (`ChunkStore`, e.g. the local
cache, which keeps chunks as ordinary objects), then the blob is assembled from the
local chunks and verified against its digest as it streams.

A server without the calls (or that answers them UNIMPLEMENTED) gets plain ByteStream:
every function here answers None when it cannot help, and the caller falls back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from casbah.cdc import Cut, FastCdcParams, cut_buffer, cut_fd, read_at
from casbah.digest import Digest
from casbah.errors import AlreadyExists, BlobNotFound, CasbahError, DataLoss, Unsupported
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.reapi.cas import CasClient
from casbah.streams import ReadVerifier

log = logging.getLogger("casbah.reapi")

FAST_CDC_2020 = re_pb2.ChunkingFunction.FAST_CDC_2020
#: Chunk bytes sent per write_many call (several batches in flight at once).
UPLOAD_GROUP = 8 << 20


def worth_chunking(params: FastCdcParams | None, size: int) -> bool:
    return params is not None and size > 2 * params.max


class ChunkStore(Protocol):
    """The local side of a chunked download (the local cache implements it)."""

    def missing(self, digests: list[Digest]) -> list[Digest]: ...
    def add_verified(self, digest: Digest, data: bytes) -> None: ...
    def object_path(self, digest: Digest) -> Path: ...


async def upload_chunked(client: CasClient, digest: Digest, source: bytes | Path,
                         progress: Callable[[int], None] | None = None) -> int | None:
    """Upload `digest` as chunks + SpliceBlob; the bytes actually sent, or None when the
    server does not take splices (the caller then streams the blob whole).  `progress(n)`
    is told, group by group, how many more of the blob's bytes are on the server (sent
    now or found there), so a bar for one large file moves as it goes."""
    caps = await client.capabilities()
    if not caps.splice or not worth_chunking(caps.cdc, digest.size) or caps.cdc is None:
        return None
    params = caps.cdc
    if isinstance(source, bytes):
        cuts = await asyncio.to_thread(cut_buffer, source, params, digest.function)
        view = memoryview(source)

        async def from_memory(offset: int, size: int) -> bytes:
            return bytes(view[offset:offset + size])

        return await _send(client, digest, cuts, from_memory, progress)
    fd = await asyncio.to_thread(os.open, source, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != digest.size:
            raise DataLoss(f"{source} changed size while it was uploaded ({size} bytes, not {digest.size})")
        cuts = await asyncio.to_thread(cut_fd, fd, params, digest.function)

        async def from_file(offset: int, size: int) -> bytes:
            return await asyncio.to_thread(read_at, fd, offset, size)

        return await _send(client, digest, cuts, from_file, progress)
    finally:
        os.close(fd)


async def _send(client: CasClient, digest: Digest, cuts: list[Cut], read: Callable[[int, int], Awaitable[bytes]],
                progress: Callable[[int], None] | None = None) -> int | None:
    chunks = [c.digest for c in cuts]
    missing = set(await client.find_missing(chunks))
    sent = covered = 0
    group: list[tuple[Digest, bytes]] = []

    async def flush() -> None:
        nonlocal group, covered
        if group:
            await _write(client, group)
            group = []
        if progress is not None and cut.offset + cut.digest.size > covered:
            progress(cut.offset + cut.digest.size - covered)
            covered = cut.offset + cut.digest.size

    for cut in cuts:
        if cut.digest in missing:
            missing.discard(cut.digest)
            group.append((cut.digest, await read(cut.offset, cut.digest.size)))
            sent += cut.digest.size
        if sum(d.size for d, _ in group) >= UPLOAD_GROUP or cut is cuts[-1]:
            await flush()
    if not await splice(client, digest, chunks):
        return None
    return sent


async def splice(client: CasClient, digest: Digest, chunks: Sequence[Digest]) -> bool:
    """SpliceBlob of chunks the server holds; False when it does not take splices."""
    if not (await client.capabilities()).splice:
        return False
    request = re_pb2.SpliceBlobRequest(
        instance_name=client.remote.instance, blob_digest=digest.to_proto(),
        digest_function=digest.function.proto_value, chunk_digests=[c.to_proto() for c in chunks],
        chunking_function=FAST_CDC_2020,
    )
    try:
        await client.remote.unary(client.remote.stubs().cas.SpliceBlob, request, "SpliceBlob")
    except AlreadyExists:
        pass  # the server keeps the blob as another chunk list: it is present
    except Unsupported:
        return False
    return True


async def _write(client: CasClient, group: list[tuple[Digest, bytes]]) -> None:
    for error in await client.write_many(group):
        if error is not None:
            raise error


async def split(client: CasClient, digest: Digest) -> list[Digest] | None:
    """The server's chunk list of a large blob, or None (no split support, or not worth it)."""
    caps = await client.capabilities()
    if not caps.split or not worth_chunking(caps.cdc, digest.size):
        return None
    request = re_pb2.SplitBlobRequest(instance_name=client.remote.instance, blob_digest=digest.to_proto(),
                                      digest_function=digest.function.proto_value, chunking_function=FAST_CDC_2020)
    try:
        response = await client.remote.unary(client.remote.stubs().cas.SplitBlob, request, "SplitBlob")
    except Unsupported:
        return None
    chunks = [Digest(c.hash, c.size_bytes, digest.function) for c in response.chunk_digests]
    if sum(c.size for c in chunks) != digest.size:
        raise DataLoss(f"SplitBlob of {digest} on {client.describe()}: chunks total "
                       f"{sum(c.size for c in chunks)} bytes, not {digest.size}")
    return chunks


async def fetch_chunks(client: CasClient, chunks: list[Digest], store: ChunkStore) -> int:
    """Put every chunk the store lacks into it (verified); the bytes received."""
    wanted = list(dict.fromkeys(await asyncio.to_thread(store.missing, chunks)))
    received = 0
    for start in range(0, len(wanted), 64):
        group = wanted[start:start + 64]
        found, lost = await client.read_many(group, verify=True)
        if lost:
            raise next(iter(lost.values()))
        for chunk in group:
            if chunk not in found:
                raise BlobNotFound(chunk, f"chunk of a split blob, not on {client.describe()}")
            await asyncio.to_thread(store.add_verified, chunk, found[chunk])
            received += chunk.size
    return received


def assemble(digest: Digest, chunks: list[Digest], store: ChunkStore, source: str) -> Iterator[bytes]:
    """The blob from the store's chunk files, verified as it streams (the last piece only
    after the whole blob matched)."""
    verifier = ReadVerifier(digest, f"{source} (chunks of the blob)")
    held: bytes | None = None
    for chunk in chunks:
        try:
            with open(store.object_path(chunk), "rb", buffering=0) as f:
                while piece := f.read(1 << 20):
                    verifier.update(piece)
                    if held is not None:
                        yield held
                    held = piece
        except FileNotFoundError:
            raise BlobNotFound(chunk, "a chunk vanished from the local cache while the blob was assembled") from None
    verifier.finish()
    if held is not None:
        yield held


__all__ = ["CasbahError", "ChunkStore", "assemble", "fetch_chunks", "splice", "split", "upload_chunked",
           "worth_chunking"]
