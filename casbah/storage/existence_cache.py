"""`existence-cache`: remembers recent "present" answers to spare a slow backend.

FindMissingBlobs is the most frequent call a build makes, and against a remote or
an object store each digest costs a round trip.  A digest seen present (or just
written) within `ttl` is answered from memory.  Only presence is cached, never
absence, so a new upload is never hidden; the price is that a blob evicted
behind our back may be reported present for up to `ttl`, which is why it stays
short (the default is 5 minutes) and reads still go to the backend.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import BlobNotFound
from casbah.storage.base import BlobInfo, Storage
from casbah.storage.loader import NodeOptions, StorageLoader, register


class ExistenceCacheStorage(Storage):
    kind = "existence-cache"

    def __init__(self, inner: Storage, ttl: float = 300.0, max_entries: int = 1_000_000, **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner = inner
        self.ttl = ttl
        self.max_entries = max_entries
        self._seen: OrderedDict[Digest, float] = OrderedDict()
        self.hits = 0

    def children(self) -> Iterable[Storage]:
        return (self.inner,)

    def _remember(self, digests: Iterable[Digest]) -> None:
        now = time.monotonic()
        seen = self._seen
        for d in digests:
            seen[d] = now
            seen.move_to_end(d)
        while len(seen) > self.max_entries:
            seen.popitem(last=False)

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        horizon = time.monotonic() - self.ttl
        seen = self._seen
        # `seen.get(d, horizon)`: an unknown digest is unknown even when the monotonic
        # clock is younger than ttl (a freshly booted machine), where any fixed
        # sentinel below `horizon` would pass for "seen".
        unknown = [d for d in digests if seen.get(d, horizon) <= horizon]
        self.hits += len(digests) - len(unknown)
        if not unknown:
            return []
        missing = await self.inner.find_missing(unknown)
        absent = set(missing)
        self._remember(d for d in unknown if d not in absent)
        return missing

    def _forget(self, digests: Iterable[Digest]) -> None:
        """A read found it gone (evicted behind our back): stop vouching for it."""
        for d in digests:
            self._seen.pop(d, None)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        try:
            return await self.inner.read(digest, offset, limit)
        except BlobNotFound:
            self._forget([digest])
            raise

    async def read_bytes(self, digest: Digest) -> bytes:
        try:
            return await self.inner.read_bytes(digest)
        except BlobNotFound:
            self._forget([digest])
            raise

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found = await self.inner.read_many(digests)
        if len(found) < len(digests):
            self._forget(d for d in digests if d not in found)
        return found

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self.inner.write(digest, chunks)
        self._remember([digest])

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        await self.inner.write_bytes(digest, data)
        self._remember([digest])

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results = await self.inner.write_many(blobs)
        self._remember(d for (d, _), err in zip(blobs, results, strict=True) if err is None)
        return results

    async def upstream_chunks(self, digest: Digest) -> list[Digest] | None:
        try:
            return await self.inner.upstream_chunks(digest)
        except BlobNotFound:
            self._forget([digest])
            raise

    async def splice_upstream(self, digest: Digest, chunks: Sequence[Digest]) -> bool | None:
        done = await self.inner.splice_upstream(digest, chunks)
        if done:
            self._remember([digest])
        return done

    async def delete(self, digests: Sequence[Digest]) -> int:
        self._forget(digests)
        return await self.inner.delete(digests)

    def iterate(self) -> AsyncIterator[BlobInfo]:
        return self.inner.iterate()

    async def stats(self) -> dict[str, int]:
        stats = await self.inner.stats()
        return {**stats, "existence_cache_entries": len(self._seen), "existence_cache_hits": self.hits}

    async def close(self) -> None:
        await self.inner.close()


class ExistenceCacheOptions(NodeOptions):
    backend: str | dict
    ttl: float = Field(default=300.0, gt=0, description="seconds a present answer is trusted")
    max_entries: int = Field(default=1_000_000, alias="max-entries", gt=0)


@register("existence-cache", ExistenceCacheOptions)
def _build(options: ExistenceCacheOptions, loader: StorageLoader, path: str) -> ExistenceCacheStorage:
    return ExistenceCacheStorage(loader.build(options.backend, f"{path}.backend"), options.ttl, options.max_entries,
                                 name=path)
