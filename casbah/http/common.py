"""What the HTTP handlers share: the front's state, bodies in and out, ranges, errors."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from aiohttp import web

from casbah.compression import Decompressor, compress_stream
from casbah.digest import Digest, DigestFunction
from casbah.errors import DigestMismatch, InvalidArgument
from casbah.http.kv import OpaqueStore
from casbah.http.sizes import SizeIndex
from casbah.server.base import Instance, Instances
from casbah.storage.base import CHUNK_SIZE

#: Largest body a PUT without a usable Content-Length (chunked, or zstd-encoded) may expand to.
MAX_SPOOLED = 1 << 40


@dataclass
class HttpState:
    """The HTTP front's view of the server: instances, their opaque stores, hash sizes."""

    instances: Instances
    opaque: dict[str, OpaqueStore]
    spool_dir: Path
    sizes: SizeIndex = field(default_factory=SizeIndex)


@dataclass(frozen=True)
class Target:
    """A parsed request path: the instance, the route (`cas`, `ac`, `opaque`) and its key."""

    instance: Instance
    route: str
    key: str  # the 64-hex hash for cas/ac; the opaque key (may end with `/` for a collection)


async def request_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The request body as it arrives, in pieces of at most 1 MiB (never whole)."""
    while True:
        chunk = await request.content.read(CHUNK_SIZE)
        if not chunk:
            return
        yield chunk


def wants_zstd(request: web.Request) -> bool:
    """`Accept-Encoding` lists zstd with a non-zero quality."""
    for item in request.headers.get("Accept-Encoding", "").split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() == "zstd":
            quality = params.strip().removeprefix("q=")
            return not params or _quality(quality) > 0
    return False


def _quality(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 1.0


def body_encoding(request: web.Request) -> str:
    """`identity` or `zstd`; anything else is refused (415 would hide it as a cache miss)."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
    if encoding not in ("identity", "zstd"):
        raise web.HTTPUnsupportedMediaType(text=f"Content-Encoding {encoding!r} is not supported (zstd is)\n")
    return encoding


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single `bytes=` range as (offset, count); None serves the whole blob (no header, or
    one this server ignores: several ranges).  Unsatisfiable: 416 with the size."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, sep, last = spec.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        if first == "":  # the last N bytes
            n = int(last)
            if n <= 0:
                raise ValueError
            start, end = max(0, size - n), size - 1
        else:
            start = int(first)
            end = int(last) if last else max(start, size - 1)
            if start < 0 or end < start:
                raise ValueError
    except ValueError:
        raise web.HTTPBadRequest(text=f"malformed Range {header!r}\n") from None
    if start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    end = min(end, size - 1)
    return start, end - start + 1


async def send_stream(request: web.Request, chunks: AsyncIterator[bytes], *, size: int | None,
                      status: int = 200, headers: dict[str, str] | None = None,
                      compress: bool = False) -> web.StreamResponse:
    """Stream a body out; zstd-compressed (no length known then) when `compress`."""
    response = web.StreamResponse(status=status, headers=headers or {})
    response.content_type = "application/octet-stream"
    if compress:
        response.headers["Content-Encoding"] = "zstd"
        response.headers["Vary"] = "Accept-Encoding"
        chunks = compress_stream(chunks)
    elif size is not None:
        response.content_length = size
    await response.prepare(request)
    async for chunk in chunks:
        await response.write(chunk)
    await response.write_eof()
    return response


class Spooled:
    """A request body of unknown decoded size, decoded to a temporary file while hashed.

    Storage wants a blob's size before its first byte; a chunked or zstd-encoded PUT
    does not tell it.  The body goes to disk (never to memory), then into storage.
    """

    def __init__(self, handle: IO[bytes], digest: Digest) -> None:
        self._handle = handle
        self.digest = digest

    @classmethod
    async def receive(cls, request: web.Request, spool_dir: Path, encoding: str) -> Spooled:
        handle = await asyncio.to_thread(tempfile.TemporaryFile, dir=spool_dir)
        hasher = hashlib.sha256()
        decompressor = Decompressor(MAX_SPOOLED) if encoding == "zstd" else None
        size = 0
        try:
            async for chunk in request_chunks(request):
                data = decompressor.feed(chunk) if decompressor is not None else chunk
                if data:
                    hasher.update(data)
                    size += len(data)
                    await asyncio.to_thread(handle.write, data)
            await asyncio.to_thread(handle.flush)
        except BaseException:
            handle.close()
            raise
        return cls(handle, Digest(hasher.hexdigest(), size, DigestFunction.SHA256))

    async def chunks(self) -> AsyncIterator[bytes]:
        await asyncio.to_thread(self._handle.seek, 0)
        while chunk := await asyncio.to_thread(self._handle.read, CHUNK_SIZE):
            yield chunk

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._handle.close()


def check_hash(text: str) -> str:
    """A lowercase SHA-256 from a URL, or 400."""
    hash_hex = text.lower()
    if len(hash_hex) != 64 or not all(c in "0123456789abcdef" for c in hash_hex):
        raise InvalidArgument(f"{text!r} is not a SHA-256 hash (64 hex digits)")
    return hash_hex


async def hash_body(request: web.Request) -> Digest:
    """Read a body to its end, hashing it (for a PUT of a blob that is already stored:
    nothing to write, but a wrong body is still a 400)."""
    hasher = hashlib.sha256()
    size = 0
    async for chunk in request_chunks(request):
        hasher.update(chunk)
        size += len(chunk)
    return Digest(hasher.hexdigest(), size, DigestFunction.SHA256)


def mismatch(expected: str, got: Digest) -> DigestMismatch:
    return DigestMismatch(f"the body hashes to {got.hash} ({got.size} bytes), not {expected}")

