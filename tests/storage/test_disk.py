"""The disk backend's own promises: LRU quota eviction, pins, restarts, races.

These go beyond the contract (test_contract.py) because they depend on the
disk layout and on what survives a restart.  Storage runs in process, on a real
directory; after each scenario `check_disk_consistent` verifies that the index,
the quota accounting and the files agree and that tmp/ is empty.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from contract import check_disk_consistent

from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DataLoss, ResourceExhausted
from casbah.storage.disk import DiskStorage
from casbah.storage.loader import StorageLoader, load_builtin_kinds

KiB = 1 << 10
MiB = 1 << 20


def blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data), data


async def stream(data: bytes, piece: int = 256 * KiB) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), piece):
        yield data[pos : pos + piece]


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())


def path_of(storage: DiskStorage, digest: Digest) -> Path:
    return storage.root / "files" / digest.hash[:2] / digest.key


def test_quota_evicts_least_recently_used_first(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=304 * KiB)
        a, b, c, d, e = (blob(100 * KiB) for _ in range(5))
        for digest, data in (a, b, c):
            await storage.write_bytes(digest, data)
        assert await storage.read_bytes(a[0]) == a[1]  # A is now the most recently used
        await storage.write(d[0], stream(d[1]))  # needs room: B goes, A stays
        # (Listed without a use: blobs used between two flushes of last use share a
        # generation, and ties are broken by key: LRU is exact only across flushes.)
        assert {digest for digest, _ in storage.engine.iterate()} == {a[0], c[0], d[0]}
        assert not path_of(storage, b[0]).exists()
        assert await storage.find_missing([c[0]]) == []  # FindMissingBlobs is a use too
        await storage.write_bytes(e[0], e[1])  # order is now A, D, C: A goes
        assert await storage.find_missing([a[0], b[0], c[0], d[0], e[0]]) == [a[0], b[0]]
        assert (await storage.stats())["evictions"] == 2
        for digest, data in (c, d, e):
            assert await storage.read_bytes(digest) == data
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_blob_being_read_is_not_evicted_when_nothing_else_can_go(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=5 * MiB + 8 * KiB)
        p, p_data = blob(3 * MiB)
        x, x_data = blob(3 * MiB)
        await storage.write_bytes(p, p_data)
        reader = await storage.read(p)
        first = await anext(reader)
        with pytest.raises(ResourceExhausted):
            await storage.write(x, stream(x_data))
        results = await storage.write_many([(x, x_data)])
        assert isinstance(results[0], ResourceExhausted)  # a per-blob status, not a failed batch
        assert await storage.find_missing([p, x]) == [x]
        rest = [chunk async for chunk in reader]
        assert first + b"".join(rest) == p_data  # the open stream was never disturbed
        # Finished streams unpin: now P can make room.
        await storage.write(x, stream(x_data))
        assert await storage.find_missing([p, x]) == [p]
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_blob_being_read_is_skipped_and_others_are_evicted(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=6 * MiB + 8 * KiB)
        p, p_data = blob(3 * MiB)  # least recently used, but being read
        q, q_data = blob(2 * MiB)
        x, x_data = blob(3 * MiB)
        y, y_data = blob(3 * MiB)
        await storage.write_bytes(p, p_data)
        await storage.write_bytes(q, q_data)
        await storage.flush_touches()
        reader = await storage.read(p)
        first = await anext(reader)
        await storage.write(x, stream(x_data))  # P is skipped, Q goes
        assert {digest for digest, _ in storage.engine.iterate()} == {p, x}  # (a listing is no use)
        assert first + b"".join([chunk async for chunk in reader]) == p_data
        # Unpinned again, P is the oldest use: the next write that needs room evicts it.
        await storage.write_bytes(y, y_data)
        assert await storage.find_missing([p, q, x, y]) == [p, q]
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_stream_closed_before_first_chunk_unpins_through_metrics_wrapper(tmp_path: Path) -> None:
    """The server's storage is wrapped in MetricsStorage; a ByteStream.Read whose client
    goes away before the first message closes a stream that was never iterated."""

    async def main() -> None:
        load_builtin_kinds()
        storage = StorageLoader({}).build({"kind": "disk", "path": str(tmp_path), "max-size": 5 * MiB + 8 * KiB}, "cas")
        p, p_data = blob(3 * MiB)
        x, x_data = blob(3 * MiB)
        await storage.write_bytes(p, p_data)
        reader = await storage.read(p)
        await reader.aclose()  # type: ignore[attr-defined]
        await storage.write(x, stream(x_data))  # P must be evictable now
        assert await storage.find_missing([p, x]) == [p]
        await storage.close()
        await check_disk_consistent(storage.inner)  # type: ignore[attr-defined]

    run(main)


def test_refused_write_evicts_nothing(tmp_path: Path) -> None:
    """When only pinned blobs could make room, the write fails and the unpinned
    blobs it would have needed besides stay: evicting them would not help it."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=6 * MiB + 8 * KiB)
        q, q_data = blob(2 * MiB)
        p, p_data = blob(3 * MiB)
        x, x_data = blob(5 * MiB)
        await storage.write_bytes(q, q_data)
        await storage.write_bytes(p, p_data)
        reader = await storage.read(p)
        await anext(reader)
        with pytest.raises(ResourceExhausted):
            await storage.write(x, stream(x_data))
        assert await storage.find_missing([q, p, x]) == [x]
        assert await storage.read_bytes(q) == q_data
        assert (await storage.stats())["evictions"] == 0
        await reader.aclose()
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_blob_larger_than_quota_is_refused_per_blob_in_batches(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=MiB)
        small1, small2 = blob(1000), blob(2000)
        huge, huge_data = blob(2 * MiB)
        results = await storage.write_many([small1, (huge, huge_data), small2])
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], ResourceExhausted)
        with pytest.raises(ResourceExhausted):
            await storage.write(huge, stream(huge_data))
        assert await storage.find_missing([small1[0], huge, small2[0]]) == [huge]
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_write_cancelled_while_evicting_gives_its_reservation_back(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=4 * MiB + 8 * KiB)
        old, old_data = blob(4 * MiB)
        new, new_data = blob(3 * MiB)
        await storage.write_bytes(old, old_data)
        task = asyncio.create_task(storage.write(new, stream(new_data)))
        await asyncio.sleep(0)  # the write has evicted OLD and waits for the unlink
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        full, full_data = blob(4 * MiB)
        await storage.write_bytes(full, full_data)  # the whole quota is usable again
        assert await storage.read_bytes(full) == full_data
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


@pytest.mark.parametrize("delay_ms", [0, 1, 2, 3, 5, 8, 13])
def test_write_cancelled_at_any_point_leaves_no_temporary_file(tmp_path: Path, delay_ms: int) -> None:
    """Cancellation can land while a chunk is being written in a thread: the
    temporary file must still be removed, not recreated behind the cleanup."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=64 * MiB)
        digest, data = blob(16 * MiB)
        task = asyncio.create_task(storage.write(digest, stream(data, MiB)))
        await asyncio.sleep(delay_ms / 1000)
        task.cancel()
        try:
            await task
            assert await storage.read_bytes(digest) == data  # finished before the cancel
        except asyncio.CancelledError:
            assert await storage.find_missing([digest]) == [digest]
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_action_cache_mode_keeps_to_its_quota(tmp_path: Path) -> None:
    """With verify off (ActionCache entries) the size is unknown until the end of
    the stream; the quota must hold all the same."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=MiB, verify=False)
        keys = [blob(10)[0] for _ in range(8)]  # action digests: not the hash of the entry
        entries = [os.urandom(300 * KiB) for _ in keys]
        for key, entry in zip(keys, entries, strict=True):
            await storage.write(key, stream(entry, 64 * KiB))
            assert (await storage.stats())["bytes"] <= MiB
        assert await storage.read_bytes(keys[-1]) == entries[-1]
        assert keys[0] in await storage.find_missing(keys)
        # Entries are overwritten in place (an ActionResult update), size and all.
        shorter = os.urandom(1000)
        await storage.write(keys[-1], stream(shorter))
        assert await storage.read_bytes(keys[-1]) == shorter
        assert await storage.read_many([keys[-1]]) == {keys[-1]: shorter}
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_restart_keeps_complete_blobs_and_drops_partial_ones(tmp_path: Path) -> None:
    a, b, c, t, d = (blob(100 * KiB) for _ in range(5))

    async def first_run() -> None:
        storage = DiskStorage(path=tmp_path)
        for digest, data in (a, b, c, t):
            await storage.write(digest, stream(data))
        assert await storage.read_bytes(a[0]) == a[1]  # A: most recently used
        await storage.close()

    run(first_run)
    # What a crash leaves: uploads in progress in tmp/, and (a machine crash without
    # fsync) an object file shorter than its name says.  Plus a stray non-blob file.
    (tmp_path / "tmp" / f"{d[0].key}.999.0").write_bytes(d[1][:5000])
    (tmp_path / "tmp" / "leftover-dir").mkdir()
    (tmp_path / "files" / t[0].hash[:2] / t[0].key).write_bytes(t[1][: 50 * KiB])  # a machine crash

    async def second_run() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=304 * KiB)
        assert os.listdir(tmp_path / "tmp") == []
        # Startup does not scan: the damaged file is found when read, answered DATA_LOSS, dropped.
        with pytest.raises(DataLoss):
            await storage.read_bytes(t[0])
        assert await storage.find_missing([t[0]]) == [t[0]]
        # LRU order survived: B, C, A (using them now would change it), so making
        # room for D evicts B.
        await storage.write_bytes(d[0], d[1])
        assert await storage.find_missing([a[0], b[0], c[0], d[0]]) == [b[0]]
        for digest, data in (a, c, d):
            assert await storage.read_bytes(digest) == data
        await storage.close()
        await check_disk_consistent(storage)

    run(second_run)


def test_restart_finds_every_digest_function_under_its_own_name(tmp_path: Path) -> None:
    """Each digest comes back from the index with its function: a gitsha1 or sha384 blob
    must come back as itself, and sha256 and sha256tree of the same hex stay apart."""
    data = os.urandom(700)  # under 1 KiB: sha256tree and sha256 share the hex
    digests = [Digest.of(data, function) for function in DigestFunction]

    async def first_run() -> None:
        storage = DiskStorage(path=tmp_path)
        for digest in digests:
            await storage.write_bytes(digest, data)
        await storage.close()

    async def second_run() -> None:
        storage = DiskStorage(path=tmp_path)
        assert await storage.find_missing(digests) == []
        assert sorted([info.digest async for info in storage.iterate()]) == sorted(digests)
        for digest in digests:
            assert await storage.read_bytes(digest) == data
            assert await storage.find_by_hash(digest.hash, digest.function) == digest
        assert (await storage.stats())["objects"] == len(digests)
        await storage.close()

    run(first_run)
    run(second_run)


def test_startup_over_a_lowered_quota_evicts_oldest_on_next_write(tmp_path: Path) -> None:
    blobs = [blob(100 * KiB) for _ in range(5)]
    extra = blob(100 * KiB)

    async def fill() -> None:
        storage = DiskStorage(path=tmp_path)
        for digest, data in blobs:
            await storage.write_bytes(digest, data)
        await storage.close()

    async def shrink() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=304 * KiB)
        await storage.write_bytes(*extra)
        missing = await storage.find_missing([d for d, _ in blobs] + [extra[0]])
        assert missing == [d for d, _ in blobs[:3]]
        await storage.close()
        await check_disk_consistent(storage)

    run(fill)
    run(shrink)


def test_file_removed_behind_casbahs_back_is_forgotten(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        small, small_data = blob(1000)
        big, big_data = blob(3 * MiB)
        cut, cut_data = blob(3 * MiB)
        for digest, data in (small, small_data), (big, big_data), (cut, cut_data):
            await storage.write_bytes(digest, data)
        path_of(storage, big).unlink()
        os.truncate(path_of(storage, cut), 2 * MiB)
        assert await storage.read_bytes(small) == small_data
        with pytest.raises(BlobNotFound):
            await storage.read(big)
        reader = await storage.read(cut)
        with pytest.raises(DataLoss):  # the damage shows only after 2 MiB were served
            async for _ in reader:
                pass
        # A blob that cannot be served must stop being reported present.
        assert await storage.find_missing([small, big, cut]) == [big, cut]
        await storage.write_bytes(big, big_data)  # and it can be uploaded again
        assert await storage.read_bytes(big) == big_data
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_concurrent_writers_of_one_blob_store_one_file(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=64 * MiB)
        digest, data = blob(3 * MiB)
        writers = [storage.write(digest, stream(data, 64 * KiB)) for _ in range(12)]
        writers += [storage.write_bytes(digest, data) for _ in range(4)]
        await asyncio.gather(*writers)
        assert await storage.read_bytes(digest) == data
        stats = await storage.stats()
        assert stats["objects"] == 1 and len(data) <= stats["bytes"] < len(data) + 8 * KiB
        await storage.close()
        await check_disk_consistent(storage)

    run(main)


def test_eviction_racing_a_reupload_of_the_victim_keeps_index_and_files_in_step(tmp_path: Path) -> None:
    """A blob evicted to make room while a client uploads it again: whatever order
    the unlink and the rename land in, a blob the index names must be readable."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=3 * MiB + 8 * KiB)
        for _ in range(25):
            await storage.delete([info.digest async for info in storage.iterate()])
            victim, victim_data = blob(MiB)
            filler, filler_data = blob(MiB)
            pusher, pusher_data = blob(MiB + MiB // 2)
            await storage.write_bytes(victim, victim_data)  # least recently used
            await storage.write_bytes(filler, filler_data)
            results = await asyncio.gather(
                storage.write(pusher, stream(pusher_data)),  # evicts the victim...
                storage.write_bytes(victim, victim_data),  # ...which is uploaded again meanwhile
                storage.write(victim, stream(victim_data, 64 * KiB)),
                return_exceptions=True,
            )
            assert results[0] is None and results[1] is None
            assert results[2] is None or isinstance(results[2], ResourceExhausted), results
            assert await storage.find_missing([victim, pusher]) == []
            assert await storage.read_bytes(victim) == victim_data
            assert await storage.read_bytes(pusher) == pusher_data
        await storage.close()
        await check_disk_consistent(storage)

    run(main)
