"""Last use in the storage engine: only a use of a blob in the oldest quarter of
`order` is recorded (and copied to the end at the next flush), so reading a store
over and over costs no write for the blobs eviction is not about to take, while a
used old blob still outlives the unused ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from casbah.digest import Digest
from casbah.storage.disk import DiskStorage
from casbah.storage.engine.index import Record, key_of

KiB = 1 << 10


def blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data), data


def seq(storage: DiskStorage, digest: Digest) -> int:
    env = storage.engine.env
    with env.begin() as txn:
        value = txn.get(key_of(digest), db=env.meta)
        assert value is not None
        return Record.unpack(value).seq


def test_reads_of_recent_blobs_record_nothing_and_old_ones_are_refreshed(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        blobs = [blob(KiB) for _ in range(8)]
        await storage.write_many(blobs)
        storage.engine.max_bytes = (await storage.stats())["bytes"]  # full: each new blob evicts one
        digests = [d for d, _ in blobs]
        await storage.flush_touches()
        before = [seq(storage, d) for d in digests]
        # The newest three quarters: served, and nothing to write.
        assert await storage.read_many(digests[2:]) == dict(blobs[2:])
        assert await storage.read_bytes(digests[7]) == blobs[7][1]
        assert storage.engine.touched == set()
        # The oldest quarter (the first two): recorded, then moved to the end.
        assert await storage.read_many(digests[:1]) == dict(blobs[:1])
        assert await storage.read_bytes(digests[1]) == blobs[1][1]
        assert storage.engine.touched == {key_of(digests[0]), key_of(digests[1])}
        await storage.flush_touches()
        after = [seq(storage, d) for d in digests]
        assert after[2:] == before[2:]
        assert min(after[:2]) > max(after[2:])
        # Eviction takes the oldest unused blobs, not the two just used.
        await storage.write_many([blob(KiB) for _ in range(2)])
        assert await storage.find_missing(digests) == digests[2:4]
        await storage.close()

    asyncio.run(main())


def test_a_store_under_half_its_quota_refreshes_nothing(tmp_path: Path) -> None:
    """No eviction is near: reads, FindMissingBlobs included, record no use at all; past
    half the quota the oldest quarter is refreshed again."""
    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        blobs = [blob(KiB) for _ in range(40)]
        await storage.write_many(blobs)
        digests = [d for d, _ in blobs]
        used = (await storage.stats())["bytes"]
        storage.engine.max_bytes = 2 * used + 1
        assert await storage.read_many(digests[:10]) == dict(blobs[:10])
        assert await storage.find_missing(digests) == []
        assert storage.engine.touched == set()
        storage.engine.max_bytes = 2 * used
        assert await storage.find_missing(digests) == []
        assert storage.engine.touched == {key_of(d) for d in digests[:10]}
        await storage.close()

    asyncio.run(main())
