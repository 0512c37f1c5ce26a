"""zstd for batch calls and ByteStream, with decompression bounded by the digest.

A compressed upload names the *uncompressed* digest, so the size it may expand to
is known up front: decompression stops with INVALID_ARGUMENT as soon as it would
produce more, which keeps a zstd bomb from filling memory.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator

import zstandard

from casbah.errors import DigestMismatch, InvalidArgument

_LEVEL = 1  # fast: the server compresses on the fly for reads


def compress(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=_LEVEL).compress(data)


def decompress(data: bytes, expected_size: int) -> bytes:
    """Decompress a whole (batch) blob that must expand to `expected_size` bytes."""
    try:
        out = zstandard.ZstdDecompressor().decompressobj().decompress(data) if data else b""
    except zstandard.ZstdError as exc:
        raise InvalidArgument(f"corrupt zstd data: {exc}") from None
    if len(out) != expected_size:
        raise DigestMismatch(f"zstd data expands to {len(out)} bytes, the digest names {expected_size}")
    return out


async def decompress_stream(chunks: AsyncIterable[bytes], expected_size: int) -> AsyncIterator[bytes]:
    dobj = zstandard.ZstdDecompressor().decompressobj()
    produced = 0
    async for chunk in chunks:
        try:
            out = dobj.decompress(chunk)
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"corrupt zstd stream: {exc}") from None
        produced += len(out)
        if produced > expected_size:
            raise DigestMismatch(f"zstd stream expands past the {expected_size} bytes its digest names")
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


class Decompressor:
    """Incremental zstd decompression of one stream, bounded by the size it must produce."""

    def __init__(self, expected_size: int) -> None:
        self._dobj = zstandard.ZstdDecompressor().decompressobj()
        self._remaining = expected_size

    def feed(self, data: bytes) -> bytes:
        try:
            out = self._dobj.decompress(data) if data else b""
        except zstandard.ZstdError as exc:
            raise InvalidArgument(f"corrupt zstd stream: {exc}") from None
        self._remaining -= len(out)
        if self._remaining < 0:
            raise DigestMismatch("zstd stream expands past the size its digest names")
        return out
