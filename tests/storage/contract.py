"""The storage factories the contract suite (test_contract.py) runs against.

Every backend must pass the same contract, so adding one is one line: write an
async generator function `factory(tmp_path) -> AsyncIterator[Storage]` that
yields a fresh, empty store and cleans up after the `yield`, then append it to
`FACTORIES`.  The test id is the function's name.  Cleanup that must happen
even when the test fails (stopping a helper server process) goes in a
`try/finally` around the `yield`; code after the `yield` outside a `finally`
runs only when the test body passed, which is the place for backend-specific
invariants, as the disk factories do below (no temporary file left behind,
quota accounting equal to what is really on disk).

The factories that go through `StorageLoader` get what the server runs: the
backend wrapped in `MetricsStorage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import composed
import scale_factories

from casbah.storage.base import Storage
from casbah.storage.disk import DiskStorage
from casbah.storage.engine import Engine
from casbah.storage.engine.index import FILE
from casbah.storage.loader import StorageLoader, load_builtin_kinds
from casbah.storage.memory import MemoryStorage

Factory = Callable[[Path], AsyncIterator[Storage]]
Body = Callable[[Storage], Awaitable[None]]

#: Quota of the quota-bound factories: large enough for every contract case
#: (the biggest reserves 12 x 3 MiB at once), so eviction never changes a result.
QUOTA = 128 << 20


async def memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = MemoryStorage(max_bytes=QUOTA)
    yield storage
    await storage.close()


async def disk(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = DiskStorage(path=tmp_path / "disk")
    yield storage
    await storage.close()
    await check_disk_consistent(storage)


async def disk_quota(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = DiskStorage(path=tmp_path / "disk", max_bytes=QUOTA)
    yield storage
    await storage.close()
    await check_disk_consistent(storage)


async def loader_memory(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "memory", "max-size": QUOTA})
    yield storage
    await storage.close()


async def loader_disk_quota(tmp_path: Path) -> AsyncIterator[Storage]:
    storage = _load({"kind": "disk", "path": str(tmp_path / "disk"), "max-size": "128M"})
    yield storage
    await storage.close()
    await check_disk_consistent(storage.inner)  # type: ignore[attr-defined]


#: Every backend the contract runs against.  Add a factory here to add a backend.
FACTORIES: list[Factory] = [memory, disk, disk_quota, loader_memory, loader_disk_quota]
# The composing kinds, defined in composed.py:
FACTORIES.append(composed.remote)
FACTORIES.append(composed.cache_memory_memory)
FACTORIES.append(composed.size_routed_memory)
FACTORIES.append(composed.sharded_3_memory)
FACTORIES.append(composed.replicated_2_memory)
FACTORIES.append(composed.existence_cache_memory)
# The scale-out kinds, against real S3 (moto), Redis and PostgreSQL servers (scale_factories.py):
FACTORIES.append(scale_factories.s3)
FACTORIES.append(scale_factories.redis)
FACTORIES.append(scale_factories.size_routed_redis_s3)
FACTORIES.append(scale_factories.blob_index_s3)


def _load(node: dict) -> Storage:
    load_builtin_kinds()
    storage = StorageLoader({}).build(node, "contract")
    assert type(storage).__name__ == "MetricsStorage", "the loader must wrap every node in MetricsStorage"
    return storage


def run_on(factory: Factory, tmp_path: Path, body: Body) -> None:
    """Run `body(storage)` on a fresh store from `factory`, in a new event loop."""

    async def main() -> None:
        async with contextlib.asynccontextmanager(factory)(tmp_path) as storage:
            await body(storage)

    asyncio.run(main())


async def check_disk_consistent(storage: DiskStorage) -> None:
    """What a disk store reports equals what is on disk, and nothing is left in tmp/.

    Checked after close() (every commit has finished), on the store reopened: the
    index names exactly the files in files/ (the large blobs), the charged bytes are
    the sum of the entries' charges, and no temporary file outlives its write (a
    failed, cancelled or rejected write included).
    """
    root = storage.root
    leftovers = sorted(os.listdir(root / "tmp"))
    assert leftovers == [], f"temporary files left behind: {leftovers}"
    on_disk = {
        entry.name: entry.stat().st_size
        for prefix in os.scandir(root / "files")
        for entry in os.scandir(prefix.path)
    }
    reopened = Engine(root, max_bytes=storage.max_bytes, verify=storage.verify)
    try:
        entries = list(reopened.iterate())
        indexed = {digest.key: record.length for digest, record in entries if record.where == FILE}
        assert on_disk == indexed, "the index and files/ disagree"
        stats = reopened.stats()
        assert stats["bytes"] == sum(record.charge for _, record in entries)
        assert stats["objects"] == len(entries)
        if storage.max_bytes:
            assert stats["bytes"] <= storage.max_bytes
    finally:
        reopened.close()
