"""Partition-and-fan-out: the shape shared by storages that send each blob to exactly one child.

`sharded` (rendezvous hashing) and `size-routed` (by size) differ only in how a
digest picks its child; everything else — splitting bulk calls per child, running
the parts concurrently, putting answers back in the caller's order, keeping lost
blobs apart from found ones — is written once here, so both route the same way.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from casbah.digest import Digest
from casbah.errors import CasbahError
from casbah.storage.base import BlobInfo, Storage, found_or_lost, read_many_partial
from casbah.storage.read_through import close_all


class PartitionedStorage(Storage):
    """A storage whose every blob lives in exactly one of `parts`, chosen by `part_index`."""

    def __init__(self, parts: Sequence[Storage], **kwargs) -> None:
        super().__init__(**kwargs)
        self.parts = list(parts)

    @abc.abstractmethod
    def part_index(self, digest: Digest) -> int:
        """The index in `parts` of the child that holds `digest`."""

    def children(self) -> Iterable[Storage]:
        return self.parts

    def _part(self, digest: Digest) -> Storage:
        return self.parts[self.part_index(digest)]

    def _group(self, digests: Sequence[Digest]) -> dict[int, list[Digest]]:
        groups: dict[int, list[Digest]] = {}
        for d in digests:
            groups.setdefault(self.part_index(d), []).append(d)
        return groups

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        groups = self._group(digests)
        results = await asyncio.gather(*(self.parts[i].find_missing(g) for i, g in groups.items()))
        missing = {d for r in results for d in r}
        return [d for d in digests if d in missing]

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        return await self._part(digest).read(digest, offset, limit)

    async def read_bytes(self, digest: Digest) -> bytes:
        return await self._part(digest).read_bytes(digest)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        groups = self._group(digests)
        found: dict[Digest, bytes] = {}
        lost: dict[Digest, CasbahError] = {}
        for got, lost_here in await asyncio.gather(*(read_many_partial(self.parts[i], g)
                                                     for i, g in groups.items())):
            found.update(got)
            lost.update(lost_here)
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self._part(digest).write(digest, chunks)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        await self._part(digest).write_bytes(digest, data)

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        groups: dict[int, list[int]] = {}
        for i, (d, _) in enumerate(blobs):
            groups.setdefault(self.part_index(d), []).append(i)
        results: list[Exception | None] = [None] * len(blobs)

        async def one(part: int, indexes: list[int]) -> None:
            errors = await self.parts[part].write_many([blobs[i] for i in indexes])
            for i, err in zip(indexes, errors, strict=True):
                results[i] = err

        await asyncio.gather(*(one(p, idx) for p, idx in groups.items()))
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        groups = self._group(digests)
        return sum(await asyncio.gather(*(self.parts[i].delete(g) for i, g in groups.items())))

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        for part in self.parts:
            async for info in part.iterate():
                yield info

    async def close(self) -> None:
        await close_all(self.parts)
