"""`size-routed`: small blobs to one backend, large ones to another (by digest size)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest
from casbah.storage.base import BlobInfo, Storage, found_or_lost, read_many_partial
from casbah.storage.loader import NodeOptions, StorageLoader, register
from casbah.storage.read_through import close_all


class SizeRoutedStorage(Storage):
    kind = "size-routed"

    def __init__(self, small: Storage, large: Storage, threshold: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.small = small
        self.large = large
        self.threshold = threshold

    def children(self) -> Iterable[Storage]:
        return (self.small, self.large)

    def _route(self, digest: Digest) -> Storage:
        return self.small if digest.size <= self.threshold else self.large

    def _split(self, digests: Sequence[Digest]) -> tuple[list[Digest], list[Digest]]:
        small = [d for d in digests if d.size <= self.threshold]
        large = [d for d in digests if d.size > self.threshold]
        return small, large

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        small, large = self._split(digests)
        results = await asyncio.gather(
            self.small.find_missing(small) if small else _none(), self.large.find_missing(large) if large else _none()
        )
        missing = set(results[0]) | set(results[1])
        return [d for d in digests if d in missing]

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        return await self._route(digest).read(digest, offset, limit)

    async def read_bytes(self, digest: Digest) -> bytes:
        return await self._route(digest).read_bytes(digest)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        small, large = self._split(digests)
        found, lost = await read_many_partial(self.small, small) if small else ({}, {})
        if large:
            got, lost_large = await read_many_partial(self.large, large)
            found.update(got)
            lost.update(lost_large)
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self._route(digest).write(digest, chunks)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        await self._route(digest).write_bytes(digest, data)

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results: list[Exception | None] = [None] * len(blobs)
        for store in (self.small, self.large):
            indexes = [i for i, (d, _) in enumerate(blobs) if self._route(d) is store]
            if indexes:
                for i, err in zip(indexes, await store.write_many([blobs[i] for i in indexes]), strict=True):
                    results[i] = err
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        small, large = self._split(digests)
        return (await self.small.delete(small) if small else 0) + (await self.large.delete(large) if large else 0)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        for store in (self.small, self.large):
            async for info in store.iterate():
                yield info

    async def close(self) -> None:
        await close_all(self.children())


async def _none() -> list[Digest]:
    return []


class SizeRoutedOptions(NodeOptions):
    small: str | dict
    large: str | dict
    threshold: int | str = Field(default="64K", description="largest size (bytes) routed to `small`")


@register("size-routed", SizeRoutedOptions)
def _build(options: SizeRoutedOptions, loader: StorageLoader, path: str) -> SizeRoutedStorage:
    return SizeRoutedStorage(
        loader.build(options.small, f"{path}.small"), loader.build(options.large, f"{path}.large"),
        parse_size(options.threshold), name=path,
    )
