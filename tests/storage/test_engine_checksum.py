"""Reads verify the checksum stored at write (XXH3-64, casbah/storage/engine/check.py).

Every `order` entry new code writes carries it; entries older code wrote have none and
are verified by the digest function, as before.  The ActionCache (`verify: false`,
keyed by action digest) is verified against it too.  Corruption is made for real, in
place in the store (the `order` database, or the file), as a bad disk would.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_engine import _old_layout, blob, flip_file, flip_inline, stream

from casbah.digest import Digest, DigestFunction
from casbah.errors import DataLoss
from casbah.storage.disk import DiskStorage
from casbah.storage.engine.check import CHECK_BYTES, checksum
from casbah.storage.engine.index import CHECKED, Record, key_of, order_value, seq_key, split_checked

KiB = 1 << 10
MiB = 1 << 20


def entry_of(storage: DiskStorage, digest: Digest) -> tuple[bytes, bytes | None, bytes]:
    env = storage.engine.env
    with env.begin() as txn:
        seq = Record.unpack(txn.get(key_of(digest), db=env.meta)).seq
        return split_checked(txn.get(seq_key(seq), db=env.order))


def rewrite_entry(storage: DiskStorage, digest: Digest, value: bytes) -> None:
    env = storage.engine.env
    with env.begin(write=True) as txn:
        seq = Record.unpack(txn.get(key_of(digest), db=env.meta)).seq
        txn.put(seq_key(seq), value, db=env.order)


def flip_check(storage: DiskStorage, digest: Digest) -> None:
    """Bit rot in the stored checksum itself (the bytes are intact)."""
    key, check, data = entry_of(storage, digest)
    assert check is not None
    rewrite_entry(storage, digest, order_value(key, data, bytes([check[0] ^ 1]) + check[1:]))


async def read_all(storage: DiskStorage, digest: Digest) -> bytes:
    return b"".join([chunk async for chunk in await storage.read(digest)])


@pytest.mark.parametrize("size", [3000, 3 * MiB], ids=["inline", "file"])
def test_new_entries_carry_the_checksum_of_their_bytes(tmp_path: Path, size: int) -> None:
    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        digest, data = blob(size)
        await storage.write(digest, stream(data))
        key, check, inline = entry_of(storage, digest)
        assert key == key_of(digest)
        assert check == checksum(data) and len(check) == CHECK_BYTES
        assert inline == (data if size <= storage.engine.inline_max else b"")
        await storage.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [3000, 3 * MiB], ids=["inline", "file"])
def test_a_corrupt_stored_checksum_reads_data_loss_once_then_missing_then_repaired(tmp_path: Path, size: int) -> None:
    """The checksum is what a read compares: damage to it alone is caught like damage to the bytes."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        digest, data = blob(size)
        await storage.write(digest, stream(data))
        flip_check(storage, digest)
        with pytest.raises(DataLoss, match="removed, upload it again"):
            await read_all(storage, digest)
        assert await storage.find_missing([digest]) == [digest]
        await storage.write(digest, stream(data))
        assert await read_all(storage, digest) == data
        assert entry_of(storage, digest)[1] == checksum(data)
        await storage.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [3000, 3 * MiB], ids=["inline", "file"])
def test_an_entry_without_a_checksum_is_verified_by_its_digest(tmp_path: Path, size: int) -> None:
    """An entry as layout-4 code before the checksum wrote it (no CHECKED bit): served when
    intact, DATA_LOSS when its bytes rotted, then missing."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path)
        good, good_data = blob(size)
        bad, bad_data = blob(size)
        for digest, data in ((good, good_data), (bad, bad_data)):
            await storage.write(digest, stream(data))
            key, _check, inline = entry_of(storage, digest)
            rewrite_entry(storage, digest, order_value(key, inline))
            value = entry_of(storage, digest)
            assert value[1] is None and value[2] == inline
        assert await read_all(storage, good) == good_data
        assert await storage.read_many([good]) == {good: good_data}
        if size > storage.engine.inline_max:
            flip_file(storage, bad, size - 10)
        else:
            flip_inline(storage, bad)
        with pytest.raises(DataLoss, match="removed, upload it again"):
            await read_all(storage, bad)
        assert await storage.find_missing([good, bad]) == [bad]
        await storage.close()

    asyncio.run(main())


@pytest.mark.parametrize("size", [3000, 300 * KiB], ids=["inline", "file"])
def test_a_corrupt_action_cache_entry_reads_data_loss_once_then_missing(tmp_path: Path, size: int) -> None:
    """`verify: false` (keyed by action digest: the digest says nothing of the bytes) is
    verified against the checksum too; before it, a rotted entry was served as-is."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, verify=False)
        action = blob(10)[0]
        entry = os.urandom(size)
        await storage.write(action, stream(entry))
        assert await read_all(storage, action) == entry
        if size > storage.engine.inline_max:
            flip_file(storage, action, size // 2)
        else:
            flip_inline(storage, action)
        with pytest.raises(DataLoss):
            await storage.read_bytes(action)
        assert await storage.find_missing([action]) == [action]
        shorter = os.urandom(1000)
        await storage.write(action, stream(shorter))  # the next UpdateActionResult
        assert await storage.read_bytes(action) == shorter
        await storage.close()

    asyncio.run(main())


def test_migration_drops_small_files_that_rotted_before_the_checksum_blesses_them(tmp_path: Path) -> None:
    blobs = [blob(100 + i) for i in range(10)] + [blob(200 * KiB)]
    _old_layout(tmp_path / "cas", blobs)
    rotten, rotten_data = blobs[3]
    (tmp_path / "cas" / "objects" / rotten.hash[:2] / rotten.key).write_bytes(bytes([rotten_data[0] ^ 1])
                                                                              + rotten_data[1:])

    async def main() -> None:
        storage = DiskStorage(path=tmp_path / "cas")
        assert await storage.find_missing([d for d, _ in blobs]) == [rotten]
        for digest, data in blobs:
            if digest != rotten:
                assert await read_all(storage, digest) == data
        big = blobs[-1][0]
        assert entry_of(storage, big)[1] is None  # renamed in unread: verified by its digest
        assert entry_of(storage, blobs[0][0])[1] == checksum(blobs[0][1])
        await storage.close()

    asyncio.run(main())


def test_the_flag_bit_is_free_for_every_key_length() -> None:
    longest = key_of(Digest("ab" * 64, 1 << 40, DigestFunction.SHA512))
    assert len(longest) < CHECKED
    key, check, data = split_checked(order_value(longest, b"xyz", b"12345678"))
    assert (key, check, data) == (longest, b"12345678", b"xyz")



def test_scrub_of_an_action_cache_store_checks_the_checksums(tmp_path: Path) -> None:
    """Before the checksum a `verify: false` store had nothing to scrub against: a scrub
    checked nothing.  Now rotted entries are found and dropped, intact ones stay."""

    async def main() -> None:
        storage = DiskStorage(path=tmp_path, verify=False)
        actions = [blob(10 + i)[0] for i in range(4)]
        entries = [os.urandom(2000), os.urandom(2000), os.urandom(300 * KiB), os.urandom(300 * KiB)]
        for action, entry in zip(actions, entries, strict=True):
            await storage.write(action, stream(entry))
        flip_inline(storage, actions[1])
        flip_file(storage, actions[3], 1000)
        checked, done, corrupt = await asyncio.to_thread(storage.engine.scrub)
        assert checked == 4 and done == sum(map(len, entries))
        assert sorted(corrupt) == sorted([actions[1], actions[3]])
        assert await storage.find_missing(actions) == [actions[1], actions[3]]
        assert await storage.read_bytes(actions[0]) == entries[0]
        assert await storage.read_bytes(actions[2]) == entries[2]
        await storage.close()

    asyncio.run(main())
