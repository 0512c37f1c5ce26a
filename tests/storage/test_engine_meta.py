"""The engine's two environments (layout 4): `meta` apart from the inline data in `index`.

The states a crash between the two commits of a write leaves are made for real, by
committing to one environment alone; layout-3 stores are built by hand in the old
format (records and counters in `index/`, no `meta/`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest
from space_helpers import fill_up

from casbah.digest import Digest
from casbah.errors import BlobNotFound, ResourceExhausted
from casbah.storage.disk import DiskStorage
from casbah.storage.engine import Engine
from casbah.storage.engine.index import Record, key_of, map_error, order_value, seq_key

_LE64 = struct.Struct("<Q")


def blobs(n: int, size: int = 600) -> list[tuple[Digest, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((Digest.of(data), data))
    return out


def make_layout3(root: Path, stored: list[tuple[Digest, bytes]], partial_meta: int = -1) -> dict[str, int]:
    """A store in layout 3: written by the engine, then its records and counters moved
    back into `index/` and `meta/` removed.  `partial_meta >= 0` then leaves a `meta/` as
    an interrupted move would: that many records copied, no mark (and one stray record).
    Returns the counters."""
    engine = Engine(root)
    engine.bulk_load(stored)
    engine.close()
    meta = lmdb.open(str(root / "meta"), max_dbs=8)
    index = lmdb.open(str(root / "index"), max_dbs=8)
    records, info = meta.open_db(b"meta"), meta.open_db(b"info")
    old, counters = index.open_db(b"meta"), index.open_db(b"info")
    with meta.begin() as src, index.begin(write=True) as dst:
        rows = list(src.cursor(db=records))
        for key, value in rows:
            dst.put(key, value, db=old)
        values = {name: _LE64.unpack(src.get(name, db=info))[0] for name in (b"charged", b"objects")}
        for name, value in values.items():
            dst.put(name, _LE64.pack(value), db=counters)
        dst.put(b"layout", _LE64.pack(3), db=counters)
    index.close()
    meta.close()
    shutil.rmtree(root / "meta")
    if partial_meta >= 0:
        meta = lmdb.open(str(root / "meta"), max_dbs=8)
        records = meta.open_db(b"meta")
        with meta.begin(write=True) as txn:
            for key, value in rows[:partial_meta]:
                txn.put(key, value, db=records)
            txn.put(b"\x01stray", Record(1, 1, 1, 0).pack(), db=records)
        meta.close()
    return {name.decode(): value for name, value in values.items()}


def assert_migrated(root: Path, stored: list[tuple[Digest, bytes]], counters: dict[str, int]) -> None:
    storage = DiskStorage(path=root)

    async def main() -> None:
        assert await storage.find_missing([d for d, _ in stored]) == []
        for digest, data in stored[:: max(len(stored) // 20, 1)]:
            assert await storage.read_bytes(digest) == data
        stats = storage.engine.stats()
        assert stats["objects"] == counters["objects"] == len(stored)
        assert stats["bytes"] == counters["charged"]
        await storage.close()

    asyncio.run(main())
    index = lmdb.open(str(root / "index"), max_dbs=8, readonly=True)
    meta = lmdb.open(str(root / "meta"), max_dbs=8, readonly=True)
    try:
        with index.begin() as txn:
            with pytest.raises(lmdb.NotFoundError):
                index.open_db(b"meta", txn=txn, create=False)  # dropped: its pages are free again
            assert _LE64.unpack(txn.get(b"layout", db=index.open_db(b"info", txn=txn, create=False)))[0] == 4
        with meta.begin() as txn:
            records = meta.open_db(b"meta", txn=txn, create=False)
            assert txn.stat(records)["entries"] == len(stored)  # no stray record from a partial copy
            assert _LE64.unpack(txn.get(b"layout", db=meta.open_db(b"info", txn=txn, create=False)))[0] == 4
    finally:
        index.close()
        meta.close()


def test_a_layout3_store_is_moved_on_open(tmp_path: Path) -> None:
    stored = blobs(300) + blobs(3, 40_000)
    counters = make_layout3(tmp_path, stored)
    assert not (tmp_path / "meta").exists()
    assert_migrated(tmp_path, stored, counters)


def test_an_interrupted_move_starts_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash mid-copy left some records (and one the old store never had) in `meta/`
    without a mark: the next open copies again from a clean `meta`, in several batches."""
    from casbah.storage.engine import migrate

    monkeypatch.setattr(migrate, "MOVE_BATCH", 64)
    stored = blobs(300)
    counters = make_layout3(tmp_path, stored, partial_meta=100)
    assert_migrated(tmp_path, stored, counters)


def test_a_move_interrupted_after_the_index_commit_only_needs_its_mark(tmp_path: Path) -> None:
    stored = blobs(50)
    engine = Engine(tmp_path)
    engine.bulk_load(stored)
    counters = engine.stats()
    engine.close()
    meta = lmdb.open(str(tmp_path / "meta"), max_dbs=8)
    with meta.begin(write=True) as txn:
        assert txn.delete(b"layout", db=meta.open_db(b"info", txn=txn))
    meta.close()
    assert_migrated(tmp_path, stored, {"objects": counters["objects"], "charged": counters["bytes"]})


def commit_in_index_only(engine: Engine, body: Callable[[lmdb.Transaction], object]) -> None:
    """Commit a change to the `index` environment alone: what a crash between the two
    commits of a write (index first, then meta) leaves behind."""
    with engine.env.data_env.begin(write=True) as txn:
        body(txn)


def test_a_record_whose_data_is_gone_reads_as_missing_never_data_loss(tmp_path: Path) -> None:
    """A delete (eviction, drop) crashed after `index` committed: the record points at
    nothing.  Reads answer NOT_FOUND (no bytes were read, none are corrupt), the record
    is dropped, and FindMissingBlobs then asks for the blob again."""
    storage = DiskStorage(path=tmp_path)
    (gone, _), (kept, kept_data) = stored = blobs(2)

    async def main() -> None:
        assert await storage.write_many(stored) == [None, None]
        engine = storage.engine
        with engine.env.begin() as txn:
            seq = Record.unpack(txn.get(key_of(gone), db=engine.env.meta)).seq
        commit_in_index_only(engine, lambda txn: txn.delete(seq_key(seq), db=engine.env.order))
        assert await storage.find_missing([gone, kept]) == []  # FindMissingBlobs reads records only
        with pytest.raises(BlobNotFound):
            await storage.read_bytes(gone)
        assert await storage.read_many([gone, kept]) == {kept: kept_data}
        await storage.flush_touches()
        assert await storage.find_missing([gone, kept]) == [gone]
        assert engine.stats()["objects"] == 1
        await storage.close()

    asyncio.run(main())


def test_an_orphaned_order_entry_is_evicted_and_scrubbed(tmp_path: Path) -> None:
    """A write crashed after `index` committed: an `order` entry no record points at.
    Eviction deletes it when it reaches it, and scrub finds it anywhere."""
    engine = Engine(tmp_path)
    stored = blobs(20)
    engine.bulk_load(stored)

    def orphan(key: bytes) -> Callable[[lmdb.Transaction], None]:
        def body(txn: lmdb.Transaction) -> None:
            seq = _LE64.unpack(txn.get(b"seq", db=engine.env.seqs))[0] + 1  # committed with `order`
            txn.put(b"seq", _LE64.pack(seq), db=engine.env.seqs)
            txn.put(seq_key(seq), order_value(key, b"x" * 600), db=engine.env.order, append=True)
        return body

    def order_entries() -> int:
        with engine.env.data_env.begin() as txn:
            return txn.stat(engine.env.order)["entries"]

    commit_in_index_only(engine, orphan(key_of(Digest("ab" * 32, 600))))
    assert order_entries() == 21
    engine.bulk_load(blobs(1))  # the next position is past the orphan: nothing overwritten
    assert order_entries() == 22
    assert engine.missing([d for d, _ in stored]) == []
    assert engine.sweep_orphans() == 1
    assert order_entries() == 21

    commit_in_index_only(engine, orphan(key_of(stored[0][0])))  # a key whose record points elsewhere
    engine.bulk_load(blobs(1))  # eviction deletes the orphan on its way to this newer blob
    assert engine.evict_to(0) == 22
    assert order_entries() == 0
    assert engine.stats()["objects"] == 0
    engine.close()


def test_a_large_find_missing_after_a_fault_runs_beside_the_event_loop(tmp_path: Path) -> None:
    """After a batch took a major page fault, large batches look up in a thread: the
    answers are the same, and the event loop runs meanwhile."""
    from casbah.storage import disk

    storage = DiskStorage(path=tmp_path)
    stored = blobs(disk.FMB_THREAD_MIN)
    absent = [d for d, _ in blobs(10)]

    async def main() -> None:
        await storage.write_many(stored)
        storage._faulting = True
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0)
        before = ticks
        assert await storage.find_missing([d for d, _ in stored] + absent) == absent
        assert ticks > before  # the loop ran while the lookups did
        ticker.cancel()
        storage._faulting = False
        assert await storage.find_missing(absent + [d for d, _ in stored]) == absent
        await storage.close()

    asyncio.run(main())


def test_gc_removes_files_no_record_names_once_they_are_old(tmp_path: Path) -> None:
    """A crash between a file's rename into `files/` and the commit that indexes it
    leaves a file no record names: gc (and scrub) remove it once it is a minute old,
    and leave younger ones (a write may be committing) and indexed files alone."""
    engine = Engine(tmp_path)
    (kept, kept_data), (old, old_data), (young, young_data) = blobs(3, 40_000)
    engine.put_many([(kept, kept_data)])
    for digest, data, age in ((old, old_data, 120), (young, young_data, 0)):
        path = Path(engine.area.path(digest))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (path.stat().st_atime - age, path.stat().st_mtime - age))
    engine.gc()
    assert not Path(engine.area.path(old)).exists()
    assert Path(engine.area.path(young)).exists()
    assert Path(engine.area.path(kept)).exists()
    assert engine.missing([kept]) == []
    os.utime(engine.area.path(young), (0, 0))
    assert engine.scrub() == (1, len(kept_data), [])
    assert not Path(engine.area.path(young)).exists()
    engine.close()


def test_a_full_map_is_resource_exhausted_with_lmdbs_error_as_its_cause(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path), map_size=64 * 1024)
    try:
        with pytest.raises(lmdb.MapFullError) as caught, env.begin(write=True) as txn:
            for i in range(10_000):
                txn.put(b"%d" % i, b"x" * 100)
    finally:
        env.close()
    error = map_error(caught.value, "disk storage cas")
    assert isinstance(error, ResourceExhausted)
    assert "disk storage cas" in str(error) and "map-size" in str(error)
    assert error.__cause__ is caught.value


def test_a_blob_rewritten_or_refreshed_while_read_never_reads_as_missing(tmp_path: Path) -> None:
    """A re-upload (two clients uploading the same blob) and a refresh both move a blob to
    a new `order` position.  Its old entry is deleted only after `meta` shows the new one:
    a reader whose `meta` snapshot still holds the old position must find it.  Before,
    readers racing the rewrites saw gaps and reported present blobs missing."""
    import threading

    engine = Engine(tmp_path / "cas")
    stored = blobs(50)
    engine.put_many(stored)
    digests = [d for d, _ in stored]
    stop = threading.Event()
    rewrites = 0

    def rewrite() -> None:
        nonlocal rewrites
        while not stop.is_set():
            engine.put_many(stored)  # every blob present: each one replaced
            engine.touched.update(key_of(d) for d in digests)
            engine.flush_touches()  # the oldest quarter refreshed
            rewrites += 1

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        for _ in range(400):
            found, corrupt, files = engine.get_inline(digests)
            assert not corrupt and not files
            assert len(found) == len(digests), f"{len(digests) - len(found)} present blobs read as missing"
            assert not engine.dangling
    finally:
        stop.set()
        writer.join()
    assert rewrites > 5
    engine.sweep_orphans()
    assert engine.stats()["objects"] == 50
    engine.close()


def test_an_io_error_under_lmdb_is_resource_exhausted_on_a_full_disk_else_unavailable(tmp_path: Path,
                                                                                     small_tmpfs: Path) -> None:
    """LMDB's commit on a filesystem that filled up under it can report EIO (seen in the
    soak): never INTERNAL — RESOURCE_EXHAUSTED when the filesystem has no room left,
    UNAVAILABLE otherwise.  The LMDB error is made here (EIO cannot be caused on demand)."""
    from casbah.errors import Unavailable

    failure = lmdb.Error("mdb_txn_commit: Input/output error")
    roomy = map_error(failure, "disk storage cas", tmp_path)
    assert isinstance(roomy, Unavailable) and roomy.__cause__ is failure
    fill_up(small_tmpfs)
    full = map_error(failure, "disk storage cas", small_tmpfs)
    assert isinstance(full, ResourceExhausted) and "disk storage cas" in str(full)
    assert isinstance(full.__cause__, OSError) and full.__cause__.__cause__ is failure
