"""`find_by_hash`: the disk and memory stores find a blob by hash alone (the HTTP front's fallback),
and the HTTP front's resolver reaches them through decorators."""

from __future__ import annotations

import asyncio
from pathlib import Path

from casbah.digest import Digest, DigestFunction
from casbah.http.sizes import SizeIndex
from casbah.storage.disk import DiskStorage
from casbah.storage.memory import MemoryStorage
from casbah.storage.metrics import MetricsStorage


def test_disk_and_memory_find_a_blob_by_hash(tmp_path: Path) -> None:
    async def main() -> None:
        for storage in (DiskStorage(path=tmp_path / "d", max_bytes=1 << 30), MemoryStorage()):
            data = b"found by its hash alone"
            digest = Digest.of(data)
            blake = Digest.of(b"another function", DigestFunction.BLAKE3)
            assert await storage.find_by_hash(digest.hash, DigestFunction.SHA256) is None
            await storage.write_bytes(digest, data)
            await storage.write_bytes(blake, b"another function")
            assert await storage.find_by_hash(digest.hash, DigestFunction.SHA256) == digest
            # The same hex under another function is another blob.
            assert await storage.find_by_hash(blake.hash, DigestFunction.SHA256) is None
            await storage.delete([digest])
            assert await storage.find_by_hash(digest.hash, DigestFunction.SHA256) is None
            # Through the metrics wrapper the loader puts around every node, and remembered after.
            await storage.write_bytes(digest, data)
            sizes = SizeIndex()
            wrapped = MetricsStorage(storage, "test")
            assert await sizes.resolve(wrapped, digest.hash) == digest
            await storage.delete([digest])
            assert await sizes.resolve(wrapped, digest.hash) == digest  # the cache; presence is checked apart
            await storage.close()

    asyncio.run(main())
