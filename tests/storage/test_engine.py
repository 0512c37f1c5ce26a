"""The storage engine behind `disk`: claims, corruption, full disks, real bytes, startup, migration.

In process on real directories (a tmpfs for the full disk), and several processes
on one store for the multi-process case.  Each test states the promise it checks.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from space_helpers import fill_up

from casbah.digest import Digest, DigestFunction
from casbah.errors import DataLoss, ResourceExhausted
from casbah.storage.disk import DiskStorage
from casbah.storage.engine import Engine
from casbah.storage.engine.index import Record, key_of, seq_key

KiB = 1 << 10
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


def blob(size: int, function: DigestFunction = DigestFunction.SHA256) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data, function), data


async def stream(data: bytes, piece: int = 256 * KiB) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), piece):
        yield data[pos : pos + piece]


def flip_inline(storage: DiskStorage, digest: Digest) -> None:
    """Bit rot in an inline blob: its last byte changes, in place in the `order` database."""
    env = storage.engine.env
    with env.begin(write=True) as txn:
        where = seq_key(Record.unpack(txn.get(key_of(digest), db=env.meta)).seq)
        value = bytearray(txn.get(where, db=env.order))
        value[-1] ^= 0xFF
        txn.put(where, bytes(value), db=env.order)


def flip_file(storage: DiskStorage, digest: Digest, offset: int) -> None:
    with open(storage.engine.area.path(digest), "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_claimed_size_reserves_nothing_and_evicts_nothing(tmp_path: Path) -> None:
    """The issue's row: 80 stored 1 MiB blobs under a 100M quota; a write naming 99 MiB
    that sends 10 bytes and stalls evicts none of them, and honest writers go ahead."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, max_bytes=100 * MiB)
        stored = [blob(MiB) for _ in range(80)]
        for digest, data in stored:
            await storage.write_bytes(digest, data)
        fake = Digest("ab" * 32, 99 * MiB)
        stalled = asyncio.Event()

        async def claim() -> AsyncIterator[bytes]:
            yield b"0123456789"
            await stalled.wait()  # the client is gone; the session lingers

        liar = asyncio.create_task(storage.write(fake, claim()))
        await asyncio.sleep(0.05)
        honest = [blob(MiB) for _ in range(3)]
        started = time.monotonic()
        for digest, data in honest:
            await storage.write(digest, stream(data))
        assert time.monotonic() - started < 5
        assert await storage.find_missing([d for d, _ in stored + honest]) == []
        assert (await storage.stats())["evictions"] == 0
        liar.cancel()
        with pytest.raises(asyncio.CancelledError):
            await liar
        assert os.listdir(tmp_path / "tmp") == []
        await storage.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [3000, 3 * MiB], ids=["inline", "file"])
def test_corrupt_blob_reads_data_loss_once_then_missing_then_repaired(tmp_path: Path, size: int) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        digest, data = blob(size)
        other, other_data = blob(size)
        await storage.write(digest, stream(data))
        await storage.write(other, stream(other_data))
        if size > storage.engine.inline_max:
            flip_file(storage, digest, size - 10)  # in the last chunk: the stream has sent MiBs first
        else:
            flip_inline(storage, digest)
        with pytest.raises(DataLoss, match="removed, upload it again"):
            reader = await storage.read(digest)
            received = b"".join([chunk async for chunk in reader])
            pytest.fail(f"a corrupt blob was served whole ({len(received)} bytes)")
        assert await storage.find_missing([digest, other]) == [digest]
        await storage.write(digest, stream(data))  # the client's re-upload
        assert await storage.read_bytes(digest) == data
        assert await storage.read_bytes(other) == other_data
        await storage.close()

    asyncio.run(main())


def test_batch_read_answers_data_loss_for_the_corrupt_blob_alone(tmp_path: Path) -> None:
    async def main() -> None:
        from casbah.storage.base import BlobsLost

        storage = DiskStorage(path=tmp_path)
        blobs = [blob(100 + i) for i in range(5)]
        await storage.write_many(blobs)
        flip_inline(storage, blobs[1][0])
        with pytest.raises(BlobsLost) as lost:
            await storage.read_many([d for d, _ in blobs])
        assert set(lost.value.lost) == {blobs[1][0]}
        assert lost.value.found == {d: b for d, b in blobs if d != blobs[1][0]}
        assert await storage.find_missing([d for d, _ in blobs]) == [blobs[1][0]]
        await storage.close()

    asyncio.run(main())


def test_a_write_of_a_present_but_corrupt_blob_repairs_it(tmp_path: Path) -> None:
    """Nobody has read it yet: the re-upload alone (a client that was told it was
    missing elsewhere, or a scrub's advice) must still replace the bad bytes."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        small, small_data = blob(5000)
        big, big_data = blob(2 * MiB)
        await storage.write_many([(small, small_data)])
        await storage.write(big, stream(big_data))
        flip_inline(storage, small)
        flip_file(storage, big, 5)
        assert await storage.write_many([(small, small_data)]) == [None]
        await storage.write(big, stream(big_data))
        assert await storage.read_bytes(small) == small_data
        assert await storage.read_bytes(big) == big_data
        await storage.close()

    asyncio.run(main())


def test_a_full_map_is_resource_exhausted_and_reads_keep_working(tmp_path: Path) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path, map_size=2 * MiB)
        kept = [blob(1000) for _ in range(20)]
        assert await storage.write_many(kept) == [None] * 20
        refused = None
        written: list[Digest] = []
        for _ in range(400):
            digest, data = blob(10 * KiB)
            result = (await storage.write_many([(digest, data)]))[0]
            if result is not None:
                refused = result
                break
            written.append(digest)
        assert isinstance(refused, ResourceExhausted), refused
        assert "full" in str(refused)
        assert await storage.read_many([d for d, _ in kept]) == dict(kept)
        assert await storage.delete(written) == len(written)  # space returns ...
        digest, data = blob(10 * KiB)
        await storage.write_bytes(digest, data)  # ... and writes work again
        assert await storage.read_bytes(digest) == data
        await storage.close()

    asyncio.run(main())


def test_a_full_filesystem_is_resource_exhausted_on_every_write_path(small_tmpfs: Path) -> None:
    """ENOSPC under LMDB (inline batches) and under files (streamed large blobs): the
    writes fail RESOURCE_EXHAUSTED naming the store, reads keep working, and writes
    work again once space returns."""

    async def main() -> None:
        storage = DiskStorage(path=small_tmpfs / "cas", name="cas")
        kept = [blob(2000) for _ in range(10)]
        assert await storage.write_many(kept) == [None] * 10
        filler = fill_up(small_tmpfs)  # filling the disk is the point
        big, big_data = blob(2 * MiB)
        with pytest.raises(ResourceExhausted, match="cas"):
            await storage.write(big, stream(big_data))
        inline_errors = []
        for _ in range(50):  # LMDB may still have free pages for a few
            result = (await storage.write_many([blob(10 * KiB)]))[0]
            if result is not None:
                inline_errors.append(result)
                break
        assert inline_errors and isinstance(inline_errors[0], ResourceExhausted), inline_errors
        assert isinstance(inline_errors[0].__cause__, OSError)  # the OS's reason, under LMDB's error
        assert inline_errors[0].__cause__.errno == errno.ENOSPC
        assert await storage.read_many([d for d, _ in kept]) == dict(kept)
        assert os.listdir(small_tmpfs / "cas" / "tmp") == []
        filler.unlink()
        await storage.write(big, stream(big_data))
        assert await storage.read_bytes(big) == big_data
        await storage.close()

    asyncio.run(main())


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


def test_the_quota_holds_in_real_bytes_under_churn(tmp_path: Path) -> None:
    """Small blobs cost more than their content; the quota counts what `du` sees, and a
    cache at its quota stays there while blobs come and go (free pages are reused)."""
    quota = 16 * MiB

    async def main() -> None:
        storage = DiskStorage(path=tmp_path / "cas", max_bytes=quota)
        content = 0
        for round_ in range(150):
            batch = [blob(512 + (i * 37) % 3000) for i in range(100)]
            batch += [blob(200 * KiB)]
            assert all(r is None for r in await storage.write_many(batch))
            content += sum(len(d) for _, d in batch)
            if round_ == 75:
                middle = du(tmp_path / "cas")
        end = du(tmp_path / "cas")
        stats = await storage.stats()
        assert content > 3 * quota  # there was churn
        assert stats["bytes"] <= quota
        # The rest is LMDB's free list: pages freed by the last transactions (docs/storage-engine.md).
        assert end <= quota * 1.3, (end, stats)
        assert end <= middle * 1.1, (middle, end)
        await storage.close()

    asyncio.run(main())


_OPEN = """
import resource, sys, time
t = time.monotonic()
from casbah.storage.engine import Engine
e = Engine(sys.argv[1])
d = e.missing([])
print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _open_cost(path: Path) -> tuple[float, int]:
    out = subprocess.run([sys.executable, "-c", _OPEN, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.split()
    return float(out[0]), int(out[1])


def test_startup_and_memory_do_not_grow_with_the_blob_count(tmp_path: Path) -> None:
    """O(1) startup, bounded memory: opening a store of 200k blobs costs what an empty one does."""
    full = Engine(tmp_path / "full")
    full.bulk_load((Digest.of(i.to_bytes(8, "big") * 8), i.to_bytes(8, "big") * 8) for i in range(200_000))
    assert full.stats()["objects"] == 200_000
    full.close()
    Engine(tmp_path / "empty").close()
    empty_t, empty_rss = min(_open_cost(tmp_path / "empty") for _ in range(2))
    full_t, full_rss = min(_open_cost(tmp_path / "full") for _ in range(2))
    assert full_t < empty_t + 0.3, (empty_t, full_t)
    assert full_rss < empty_rss + 10 * 1024, (empty_rss, full_rss)  # KiB: no per-blob memory


def _old_layout(root: Path, blobs: list[tuple[Digest, bytes]]) -> None:
    """The file-per-blob layout of casbah before the engine (disk_files.py, git history):
    `objects/<first 2 hex of the hash>/<Digest.key>`, `tmp/` beside it."""
    (root / "tmp").mkdir(parents=True)
    (root / "tmp" / "partial.1.0").write_bytes(b"partial")
    for prefix in range(256):
        (root / "objects" / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
    for digest, data in blobs:
        (root / "objects" / digest.hash[:2] / digest.key).write_bytes(data)
    (root / "objects" / "ab" / "not-a-blob").write_bytes(b"junk")


def test_an_old_file_per_blob_store_is_imported_on_first_open(tmp_path: Path) -> None:
    blobs = [blob(100 + i) for i in range(50)] + [blob(200 * KiB), blob(3000, DigestFunction.BLAKE3)]
    _old_layout(tmp_path / "cas", blobs)
    (tmp_path / "cas" / "objects" / blobs[0][0].hash[:2] / blobs[0][0].key).write_bytes(b"truncated")

    async def main() -> None:
        storage = DiskStorage(path=tmp_path / "cas")
        assert not (tmp_path / "cas" / "objects").exists()
        assert os.listdir(tmp_path / "cas" / "tmp") == []
        assert await storage.find_missing([d for d, _ in blobs]) == [blobs[0][0]]  # the bad file was dropped
        for digest, data in blobs[1:]:
            assert await storage.read_bytes(digest) == data
        assert (await storage.stats())["objects"] == len(blobs) - 1
        await storage.close()

    asyncio.run(main())


def test_admin_migrate_imports_a_data_dir(tmp_path: Path) -> None:
    blobs = [blob(100 + i) for i in range(20)] + [blob(150 * KiB)]
    _old_layout(tmp_path / "data" / "cas", blobs)
    done = subprocess.run([sys.executable, "-m", "casbah", "admin", "migrate", "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"{len(blobs)} blobs" in done.stdout, done.stdout
    assert "imported 21 blobs" in done.stderr
    assert not (tmp_path / "data" / "cas" / "objects").exists()
    engine = Engine(tmp_path / "data" / "cas")
    try:
        assert engine.missing([d for d, _ in blobs]) == []
    finally:
        engine.close()


_WRITER = """
import os, sys
from casbah.digest import Digest
from casbah.storage.engine import Engine
e = Engine(sys.argv[1], max_bytes=int(sys.argv[3]))
seed = int(sys.argv[2])
blobs = [(Digest.of(d), d) for d in (seed.to_bytes(4, "big") + os.urandom(2000) for _ in range(300))]
for i in range(0, 300, 10):
    assert e.put_many(blobs[i:i + 10]) == [None] * 10
big = os.urandom(300_000)
assert e.put_many([(Digest.of(big), big)]) == [None]
print(" ".join(d.hash for d, _ in blobs[:20]))
e.close()
"""


def test_processes_share_one_store(tmp_path: Path) -> None:
    """What `serve --workers N` relies on: several processes write one store at once;
    each sees every blob the others committed, and the quota accounting stays whole."""
    Engine(tmp_path / "cas", max_bytes=64 * MiB).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / "cas"), str(i), str(64 * MiB)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
             for i in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    engine = Engine(tmp_path / "cas", max_bytes=64 * MiB)
    try:
        stats = engine.stats()
        assert stats["objects"] == 3 * 301
        entries = list(engine.iterate())
        assert stats["bytes"] == sum(record.charge for _, record in entries)
        hashes = [h for out in outputs for h in out.split()]
        assert engine.missing([Digest(h, 2004) for h in hashes]) == []
    finally:
        engine.close()
    shutil.rmtree(tmp_path / "cas")
