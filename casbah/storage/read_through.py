"""`cache`: a fast backend in front of a slow one (read-through).

Reads try the fast store and fill it from the slow one on a miss, streaming:
the blob is teed into the fast store while it is served, never buffered whole.
Writes go to both (`write-through`, the default) or to the slow store only
(`write-slow`: the fast store fills on the next read).  Small blobs (batch reads
and writes) are copied into the fast store in the background, within a budget,
so a miss costs the slow store's latency and not the fast store's as well.  FindMissingBlobs asks
the fast store first and only forwards what it lacks.

The slow store's answer is the truth for writes (a write fails if the slow store
refuses it); the fast store is best effort (a full or failing fast store never
fails a read or a write, it only logs).  A read served from the fast store never
touches the slow one, so an edge keeps serving what it holds while its upstream
is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss
from casbah.storage.base import BlobInfo, Storage, found_or_lost, read_many_partial, read_one
from casbah.storage.loader import NodeOptions, StorageLoader, register

log = logging.getLogger(__name__)
_QUEUE = 4
#: Bytes of small blobs being copied into the fast store in the background, at most.
FILL_BUDGET = 64 * 1024 * 1024


class ReadThroughStorage(Storage):
    kind = "cache"

    def __init__(self, fast: Storage, slow: Storage, write_mode: str = "write-through", **kwargs) -> None:
        super().__init__(**kwargs)
        self.fast = fast
        self.slow = slow
        self.write_mode = write_mode
        self._fills: set[asyncio.Task] = set()
        self._fill_bytes = 0

    def children(self) -> Iterable[Storage]:
        return (self.fast, self.slow)

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        not_fast = await self.fast.find_missing(digests)
        if not not_fast:
            return []
        return await self.slow.find_missing(not_fast)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        try:
            return await self.fast.read(digest, offset, limit)
        except BlobNotFound:
            pass
        except DataLoss as exc:  # a fast store that verifies on read (Redis): serve the slow copy
            log.warning("cache %s: %s; reading the slow store", self.name, exc)
        if offset or limit:
            return await self.slow.read(digest, offset, limit)  # a partial read cannot fill the cache
        stream = await self.slow.read(digest)
        return TeeStream(self.fast, digest, stream)

    async def upstream_chunks(self, digest: Digest) -> list[Digest] | None:
        """The slow side's chunk list of a blob the fast side lacks (an edge in front of a
        splitting upstream): the spliced layer then reads the chunks through this cache, so
        those the fast side holds are served locally and the others fetched and kept."""
        if await self.fast.has(digest):
            return None
        return await self.slow.upstream_chunks(digest)

    async def splice_upstream(self, digest: Digest, chunks: Sequence[Digest]) -> bool | None:
        """The slow store is the truth for writes: a splice goes to it (its chunks went
        there as they were written)."""
        return await self.slow.splice_upstream(digest, chunks)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found, _ = await read_many_partial(self.fast, digests)  # a lost fast copy is a miss
        rest = [d for d in digests if d not in found]
        if rest:
            # Blobs the slow store lost (failed verification) are neither filled nor served.
            filled, lost = await read_many_partial(self.slow, rest)
            if filled:
                await self._fill(list(filled.items()))
            found.update(filled)
            return found_or_lost(found, lost)
        return found

    async def _fill(self, blobs: list[tuple[Digest, bytes]]) -> None:
        """Copy small blobs into the fast store in the background: the caller already has
        them, and a disk store's file creations would otherwise double a miss's latency.
        Bounded: past FILL_BUDGET bytes in flight, the caller waits for its own copy."""
        size = sum(len(data) for _, data in blobs)
        if self._fill_bytes + size > FILL_BUDGET:
            await self._fill_now(blobs)
            return
        self._fill_bytes += size
        task = asyncio.get_running_loop().create_task(self._fill_now(blobs))
        self._fills.add(task)

        def done(task: asyncio.Task) -> None:
            self._fills.discard(task)
            self._fill_bytes -= size

        task.add_done_callback(done)

    async def _fill_now(self, blobs: list[tuple[Digest, bytes]]) -> None:
        try:
            results = await self.fast.write_many(blobs)
        except Exception as exc:
            log.warning("cache %s: could not fill the fast store: %s", self.name, exc)
            return
        failed = [(d, e) for (d, _), e in zip(blobs, results, strict=True) if e is not None]
        if failed:
            log.warning("cache %s: could not copy %d blob(s) into the fast store, e.g. %s: %s", self.name,
                        len(failed), failed[0][0], failed[0][1])

    async def settle(self) -> None:
        """Wait for background copies into the fast store (tests, shutdown)."""
        while self._fills:
            await asyncio.gather(*list(self._fills), return_exceptions=True)

    async def read_bytes(self, digest: Digest) -> bytes:
        return await read_one(self, digest)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if self.write_mode == "write-slow":
            await self.slow.write(digest, chunks)
            return
        await write_both(self.slow, self.fast, digest, chunks)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        """Through write_many: a blob held in memory can be retried by a remote slow store."""
        error = (await self.write_many([(digest, data)]))[0]
        if error is not None:
            raise error

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results = await self.slow.write_many(blobs)
        if self.write_mode == "write-through":
            stored = [b for b, err in zip(blobs, results, strict=True) if err is None]
            if stored:
                await self._fill(stored)
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        await self.settle()  # a copy still in flight would bring a deleted blob back
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

    async def close(self) -> None:
        await self.settle()
        await close_all(self.children())


async def close_all(stores: Iterable[Storage]) -> None:
    """Close decorated stores (inline nodes are closed by nobody else; closing is idempotent)."""
    for store in stores:
        try:
            await store.close()
        except Exception:
            log.exception("closing %s failed", store.name)


async def put_unless_done(queue: asyncio.Queue, item: object, consumer: asyncio.Task) -> bool:
    """Put `item` for `consumer`, unless the consumer ends first (it would never take it:
    a plain `put` on a full queue would then wait forever).  True if the item was queued."""
    if consumer.done():
        return False
    try:
        queue.put_nowait(item)
        return True
    except asyncio.QueueFull:
        pass
    put = asyncio.ensure_future(queue.put(item))
    try:
        await asyncio.wait((put, consumer), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not put.done():
            put.cancel()
    return not put.cancelled()


async def _drain(queue: asyncio.Queue) -> AsyncIterator[bytes]:
    while (chunk := await queue.get()) is not None:
        yield chunk


class TeeStream:
    """Serves `stream` and writes it into `target` at the same time (fill or repair).

    The copy is best effort: if `target` refuses or fails, the reader is still
    served.  When the reader gets to the end, the copy is awaited (so the blob is
    in `target` when the read completes); a reader that stops early abandons the
    copy, which then stores nothing.  A class rather than an async generator so
    that `aclose` reaches the source stream even when iteration never started.
    """

    def __init__(self, target: Storage, digest: Digest, stream: AsyncIterator[bytes]) -> None:
        self._target = target
        self._digest = digest
        self._stream = stream
        self._it = aiter(stream)
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)
        self._fill: asyncio.Task | None = None
        self._finished = False

    def __aiter__(self) -> TeeStream:
        return self

    async def __anext__(self) -> bytes:
        if self._fill is None and not self._finished:
            self._fill = asyncio.get_running_loop().create_task(self._target.write(self._digest, _drain(self._queue)))
        try:
            chunk = await anext(self._it)
        except StopAsyncIteration:
            await self._finish(complete=True)
            raise
        except BaseException:
            await self._finish(complete=False)
            raise
        if self._fill is not None and not self._fill.done():
            await put_unless_done(self._queue, chunk, self._fill)
        return chunk

    async def _finish(self, complete: bool) -> None:
        if self._finished:
            return
        self._finished = True
        fill = self._fill
        if fill is None:
            return
        if (complete and await put_unless_done(self._queue, None, fill)) or fill.done():
            try:
                await fill
            except asyncio.CancelledError:
                if not fill.cancelled():
                    raise
            except Exception as exc:
                log.warning("could not copy %s into %s: %s", self._digest, self._target.name, exc)
            return
        fill.cancel()
        with contextlib.suppress(BaseException):
            await fill

    async def aclose(self) -> None:
        await self._finish(complete=False)
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


async def write_both(primary: Storage, secondary: Storage, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
    """Stream one upload into two stores at once; the primary's outcome is the result.

    The secondary (a cache) may fail or refuse without failing the write.  When the
    primary ends without reading the whole stream (it already had the blob), the
    secondary's copy is abandoned quietly: it would fail for lack of data.
    """
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(_QUEUE)
    side = asyncio.get_running_loop().create_task(secondary.write(digest, _drain(queue)))
    exhausted = False

    async def tee() -> AsyncIterator[bytes]:
        nonlocal exhausted
        async for chunk in chunks:
            await put_unless_done(queue, chunk, side)
            yield chunk
        exhausted = True

    try:
        await primary.write(digest, tee())
    except BaseException:
        side.cancel()
        with contextlib.suppress(BaseException):
            await side
        raise
    if not exhausted and not side.done():
        side.cancel()
        with contextlib.suppress(BaseException):
            await side
        return
    await put_unless_done(queue, None, side)
    try:
        await side
    except CasbahError as exc:
        log.warning("cache: could not fill %s with %s: %s", secondary.name, digest, exc)


class ReadThroughOptions(NodeOptions):
    fast: str | dict
    slow: str | dict
    write_mode: str = Field(default="write-through", alias="write-mode", pattern="^(write-through|write-slow)$")


@register("cache", ReadThroughOptions)
def _build(options: ReadThroughOptions, loader: StorageLoader, path: str) -> ReadThroughStorage:
    return ReadThroughStorage(
        loader.build(options.fast, f"{path}.fast"), loader.build(options.slow, f"{path}.slow"),
        options.write_mode, name=path,
    )
