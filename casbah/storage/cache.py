"""`cache`: a fast backend in front of a slow one (read-through).

Reads try the fast store and fill it from the slow one on a miss, streaming:
the blob is teed into the fast store while it is served, never buffered whole.
Writes go to both (`write-through`, the default) or to the slow store only
(`write-slow`: the fast store fills on the next read).  FindMissingBlobs asks
the fast store first and only forwards what it lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError
from casbah.storage.base import BlobInfo, Storage
from casbah.storage.loader import NodeOptions, StorageLoader, register

log = logging.getLogger(__name__)
_QUEUE = 4


class CacheStorage(Storage):
    kind = "cache"

    def __init__(self, fast: Storage, slow: Storage, write_mode: str = "write-through", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fast = fast
        self.slow = slow
        self.write_mode = write_mode

    def children(self) -> Iterable[Storage]:
        return (self.fast, self.slow)

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        not_fast = await self.fast.find_missing(digests)
        if not not_fast:
            return []
        return await self.slow.find_missing(not_fast)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        try:
            return await self.fast.read(digest, offset, limit)
        except BlobNotFound:
            pass
        if offset or limit:
            return await self.slow.read(digest, offset, limit)  # a partial read cannot fill the cache
        stream = await self.slow.read(digest)
        return tee_into(self.fast, digest, stream)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found = await self.fast.read_many(digests)
        rest = [d for d in digests if d not in found]
        if rest:
            filled = await self.slow.read_many(rest)
            if filled:
                await self.fast.write_many(list(filled.items()))
            found.update(filled)
        return found

    async def read_bytes(self, digest: Digest) -> bytes:
        found = await self.read_many([digest])
        if digest not in found:
            raise BlobNotFound(digest)
        return found[digest]

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if self.write_mode == "write-slow":
            await self.slow.write(digest, chunks)
            return
        await _write_both(self.slow, self.fast, digest, chunks)

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results = await self.slow.write_many(blobs)
        if self.write_mode == "write-through":
            stored = [b for b, err in zip(blobs, results, strict=True) if err is None]
            if stored:
                await self.fast.write_many(stored)
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        removed = await self.fast.delete(digests)
        try:
            removed = max(removed, await self.slow.delete(digests))
        except CasbahError as exc:
            log.debug("cache: slow store cannot delete: %s", exc)
        return removed

    def iterate(self) -> AsyncIterator[BlobInfo]:
        return self.slow.iterate()

    async def stats(self) -> dict[str, int]:
        return await self.fast.stats()


async def tee_into(target: Storage, digest: Digest, stream: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Serve `stream` and write it into `target` at the same time (fill or repair).

    The copy is best effort: if `target` refuses, the reader is still served.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)

    async def feed() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    fill = asyncio.get_running_loop().create_task(target.write(digest, feed()))
    ok = False
    try:
        async for chunk in stream:
            if not fill.done():
                await queue.put(chunk)
            yield chunk
        ok = True
    finally:
        if ok and not fill.done():
            await queue.put(None)
            try:
                await fill
            except CasbahError as exc:
                log.warning("could not copy %s into %s: %s", digest, target.name, exc)
        else:
            fill.cancel()
            with contextlib.suppress(BaseException):
                await fill


async def _write_both(primary: Storage, secondary: Storage, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
    """Stream one upload into two stores at once; the primary's outcome is the result.

    The secondary (a cache) may fail or refuse without failing the write.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)

    async def feed() -> AsyncIterator[bytes]:
        while (chunk := await queue.get()) is not None:
            yield chunk

    side = asyncio.get_running_loop().create_task(secondary.write(digest, feed()))

    async def tee() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            if not side.done():
                await queue.put(chunk)
            yield chunk

    try:
        await primary.write(digest, tee())
    except BaseException:
        side.cancel()
        with contextlib.suppress(BaseException):
            await side
        raise
    if not side.done():
        await queue.put(None)
    try:
        await side
    except CasbahError as exc:
        log.warning("cache: could not fill the fast store with %s: %s", digest, exc)


class CacheOptions(NodeOptions):
    fast: str | dict
    slow: str | dict
    write_mode: str = Field(default="write-through", alias="write-mode", pattern="^(write-through|write-slow)$")


@register("cache", CacheOptions)
def _build(options: CacheOptions, loader: StorageLoader, path: str) -> CacheStorage:
    return CacheStorage(
        loader.build(options.fast, f"{path}.fast"), loader.build(options.slow, f"{path}.slow"),
        options.write_mode, name=path,
    )
