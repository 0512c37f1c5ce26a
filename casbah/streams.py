"""Byte streams and their verification: what both the storage side and the REAPI client use.

Kept apart from `casbah.storage` and `casbah.reapi` so neither has to import the
other to hash a stream: a storage backend verifies what it stores, the client
verifies what it downloads, with the same `Verifier`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator
from typing import NoReturn

from casbah.digest import Digest, Hasher
from casbah.errors import DataLoss, DigestMismatch

#: Chunk size for streams (storage reads, ByteStream messages): big enough that
#: per-chunk overhead (a thread hop, a gRPC message) is small against the copy,
#: small enough to keep memory bounded with many concurrent streams.
CHUNK_SIZE = 1024 * 1024


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    """A stream of one chunk: a blob already in memory, for an API that takes streams."""
    yield data


async def empty_stream() -> AsyncIterator[bytes]:
    """The stream of the empty blob."""
    return
    yield  # pragma: no cover - makes this an async generator


async def coalesce(chunks: AsyncIterable[bytes], size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """Chunks of exactly `size` bytes (the last one shorter): Bazel uploads in 16 KiB
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


class Verifier:
    """Hashes a stream as it passes and checks it against the digest at the end."""

    __slots__ = ("_hasher", "digest", "received")

    def __init__(self, digest: Digest) -> None:
        self.digest = digest
        self._hasher: Hasher = digest.function.hasher(digest.size)
        self.received = 0

    def update(self, chunk: bytes | memoryview) -> None:
        self.received += len(chunk)
        if self.received > self.digest.size:
            self._fail(f"has more than the {self.digest.size} bytes its digest names")
        self._hasher.update(chunk)

    def finish(self) -> None:
        if self.received != self.digest.size:
            self._fail(f"has {self.received} bytes, its digest names {self.digest.size}")
        actual = self._hasher.hexdigest()
        if actual != self.digest.hash:
            self._fail(f"hashes to {actual} with {self.digest.function.value}")

    def _fail(self, problem: str) -> NoReturn:
        raise DigestMismatch(f"upload for {self.digest} {problem}")


class ReadVerifier(Verifier):
    """A Verifier for reads: the bytes came from `source`, so a mismatch is DataLoss
    (the stored copy is corrupt or the source lies), naming both digest and source."""

    __slots__ = ("source",)

    def __init__(self, digest: Digest, source: str) -> None:
        super().__init__(digest)
        self.source = source

    def _fail(self, problem: str) -> NoReturn:
        raise DataLoss(f"blob {self.digest} as read from {self.source} {problem}: not served")


class NoVerifier(Verifier):
    __slots__ = ()

    def update(self, chunk: bytes | memoryview) -> None:
        self.received += len(chunk)

    def finish(self) -> None:
        return None


async def hashed(chunks: AsyncIterable[bytes], verifier: Verifier) -> AsyncIterator[bytes]:
    """Pass chunks on, feeding each to `verifier` first (the caller calls `finish`)."""
    async for chunk in chunks:
        verifier.update(chunk)
        yield chunk


async def verified_range(chunks: AsyncIterable[bytes], verifier: Verifier, offset: int, count: int,
                         hashed: bool = False) -> AsyncIterator[bytes]:
    """Pass on bytes `offset .. offset+count` of a blob read whole from its start,
    hashing every byte, and never the last piece before the whole blob verified: a
    consumer cannot receive a complete wrong blob (or range) with success.

    A whole-blob read (the hot path: Bazel and BuildStream read whole blobs) yields
    each chunk as it came, without a copy, once it is hashed; the last chunk after
    `finish()`.  A ranged read costs the rest of the blob: a slice cannot be verified
    by itself.  `hashed`: the source already fed `verifier` (in its own thread hop).
    """
    size = verifier.digest.size
    end = offset + count
    whole = offset == 0 and count == size
    position = 0
    finished = False
    held: bytes | None = None
    async for chunk in chunks:
        if not hashed:
            verifier.update(chunk)
        start, position = position, position + len(chunk)
        if position >= size:
            verifier.finish()
            finished = True
        if whole:
            yield chunk
            continue
        lo, hi = max(start, offset), min(position, end)
        if hi > lo:
            piece = chunk[lo - start : hi - start]
            if hi == end and not finished:
                held = piece  # the range's last piece waits for the rest of the blob
            else:
                yield piece
        if finished and held is not None:
            yield held
            held = None
    if not finished:
        verifier.finish()  # a source that ended short: a mismatch, whatever the source said
        if held is not None:
            yield held  # only without verification (a _NoVerifier finishes quietly)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """`os.write` until every byte is written (a write to a file or pipe may be short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def file_chunks(path: str | os.PathLike, offset: int = 0, size: int = CHUNK_SIZE) -> AsyncIterator[bytes]:
    """A local file as a byte stream from `offset`, each read in a thread (the event
    loop never waits on the disk); with an offset, a resumable upload's source."""
    f = await asyncio.to_thread(open, path, "rb", buffering=0)
    try:
        if offset:
            f.seek(offset)
        while chunk := await asyncio.to_thread(f.read, size):
            yield chunk
    finally:
        f.close()
