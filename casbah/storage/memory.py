"""`memory`: an LRU of blobs bounded by bytes, for tests, edges and fast tiers.

Everything runs on the event loop: dictionary operations are far cheaper than a
thread hop.  A write is buffered in a list of chunks until verified; a blob larger
than the whole quota is refused before its data is read.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Sequence

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, ResourceExhausted
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, check_range
from casbah.storage.loader import NodeOptions, register


class MemoryStorage(Storage):
    kind = "memory"

    def __init__(self, *, max_bytes: int = 1 << 30, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_bytes = max_bytes
        self._blobs: OrderedDict[Digest, bytes] = OrderedDict()
        self._size = 0
        self.evictions = 0

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        blobs = self._blobs
        missing = []
        for digest in digests:
            if digest in blobs:
                blobs.move_to_end(digest)
            else:
                missing.append(digest)
        return missing

    async def has(self, digest: Digest) -> bool:
        return digest in self._blobs

    def _get(self, digest: Digest) -> bytes:
        try:
            data = self._blobs[digest]
        except KeyError:
            raise BlobNotFound(digest) from None
        self._blobs.move_to_end(digest)
        return data

    async def find_by_hash(self, hash_hex: str, function: DigestFunction) -> Digest | None:
        """The stored blob with this hash, whatever its size (a scan: a fallback for
        protocols that name blobs by hash alone)."""
        return next((d for d in self._blobs if d.hash == hash_hex and d.function is function), None)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        data = self._get(digest)
        count = check_range(digest, len(data), offset, limit)
        return _chunks(data, offset, offset + count)

    async def read_bytes(self, digest: Digest) -> bytes:
        return self._get(digest)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        blobs = self._blobs
        found = {}
        for digest in digests:
            data = blobs.get(digest)
            if data is not None:
                blobs.move_to_end(digest)
                found[digest] = data
        return found

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if self.verify:
            self._check_fits(digest, digest.size)
        verifier = self.verifier(digest)
        parts = []
        async for chunk in chunks:
            verifier.update(chunk)
            parts.append(chunk)
        verifier.finish()
        self._put(digest, b"".join(parts))

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        self._check_fits(digest, len(data))
        verifier = self.verifier(digest)
        verifier.update(data)
        verifier.finish()
        self._put(digest, data)

    def _check_fits(self, digest: Digest, size: int) -> None:
        """A blob larger than the whole store is refused: storing it would evict
        everything else and then the blob itself."""
        if size > self.max_bytes:
            raise ResourceExhausted(f"blob {digest} is larger than the memory store ({self.max_bytes} bytes)")

    def _put(self, digest: Digest, data: bytes) -> None:
        self._check_fits(digest, len(data))
        old = self._blobs.pop(digest, None)
        if old is not None:
            self._size -= len(old)
        self._blobs[digest] = data
        self._size += len(data)
        while self._size > self.max_bytes and self._blobs:
            _, evicted = self._blobs.popitem(last=False)
            self._size -= len(evicted)
            self.evictions += 1

    async def delete(self, digests: Sequence[Digest]) -> int:
        removed = 0
        for digest in digests:
            data = self._blobs.pop(digest, None)
            if data is not None:
                self._size -= len(data)
                removed += 1
        return removed

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        now = time.time()
        for digest, data in list(self._blobs.items()):
            yield BlobInfo(digest, len(data), now)

    async def stats(self) -> dict[str, int]:
        return {
            "bytes": self._size,
            "objects": len(self._blobs),
            "quota_bytes": self.max_bytes,
            "evictions": self.evictions,
        }


async def _chunks(data: bytes, start: int, end: int) -> AsyncIterator[bytes]:
    view = memoryview(data)
    for pos in range(start, end, CHUNK_SIZE):
        yield bytes(view[pos : min(end, pos + CHUNK_SIZE)])


class MemoryOptions(NodeOptions):
    max_size: int | str = Field(default="1G", alias="max-size")


@register("memory", MemoryOptions)
def _build(options: MemoryOptions, loader: object, path: str) -> MemoryStorage:
    return MemoryStorage(max_bytes=parse_size(options.max_size), verify=options.verify, name=path)
