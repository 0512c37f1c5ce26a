"""zstd for batch calls and ByteStream, with decompression bounded by the digest.

A compressed upload names the *uncompressed* digest, so the size it may expand to
is known up front: decompression stops with INVALID_ARGUMENT as soon as it would
produce more, which keeps a zstd bomb from filling memory.  zstd's RLE blocks
reach ratios over 30,000:1 (1 GiB of zeros is 32 KiB), so the bound is enforced
on the output as it is produced, `_WRITE_SIZE` bytes at a time, never after a
whole input chunk has been expanded.

A zstd stream may be several concatenated frames (RFC 8878); all are decoded.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import IO, cast

import zstandard

from casbah.errors import DigestMismatch, InvalidArgument

_LEVEL = 1  # fast: the server compresses on the fly for reads
_WRITE_SIZE = 256 * 1024  # largest piece of output produced before the bound is checked


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_LEVEL).compress(data)


class _BoundedSink:
    """Collects decompressed output; refuses to hold more than `remaining` bytes."""

    def __init__(self, limit: int) -> None:
        self.remaining = limit
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self.remaining -= len(data)
        if self.remaining < 0:
            raise DigestMismatch("zstd data expands past the size its digest names")
        self.parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        if not self.parts:
            return b""
        out = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts = []
        return out


class Decompressor:
    """Incremental zstd decompression of one stream, bounded by the size it must produce."""

    def __init__(self, expected_size: int) -> None:
        self._sink = _BoundedSink(expected_size)
        # The writer only calls `write()`; the stub asks for a whole IO[bytes].
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            cast("IO[bytes]", self._sink), write_size=_WRITE_SIZE, write_return_read=True, closefd=False
        )

    def feed(self, data: bytes) -> bytes:
        """Decompress one more piece of the stream; returns what it produced (maybe nothing)."""
        if data:
            try:
                self._writer.write(data)
            except zstandard.ZstdError as exc:
                raise InvalidArgument(f"corrupt zstd stream: {exc}") from None
        return self._sink.take()


def decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress a whole (batch) blob that must expand to `expected_size` bytes."""
    out = Decompressor(expected_size).feed(data)
    if len(out) != expected_size:
        raise DigestMismatch(f"zstd data expands to {len(out)} bytes, the digest names {expected_size}")
    return out


async def decompress_stream(chunks: AsyncIterable[bytes], expected_size: int) -> AsyncIterator[bytes]:
    """Decompress a stream; never yields more than `expected_size` bytes in total (the storage
    write verifies the exact size and hash)."""
    decompressor = Decompressor(expected_size)
    async for chunk in chunks:
        out = decompressor.feed(chunk)
        if out:
            yield out


async def compress_stream(chunks: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    cobj = zstandard.ZstdCompressor(level=_LEVEL).compressobj()
    async for chunk in chunks:
        out = cobj.compress(chunk)
        if out:
            yield out
    tail = cobj.flush()
    if tail:
        yield tail
