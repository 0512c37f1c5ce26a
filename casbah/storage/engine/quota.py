"""What each entry costs on disk, and eviction by last-use generation.

The quota counts bytes really used on disk, estimated per entry when it is written
(so eviction needs no scan) and kept as a running total (`info/charged`) in the same
transactions as the entries:

- an inline value up to `LEAF_MAX` bytes shares the `order` database's leaf pages,
  which are appended to and so full; a larger one takes whole overflow pages (4 KiB
  each, a 16-byte header);
- a file takes its blocks (`st_blocks * 512`, measured after the write);
- every entry also has its `meta` record, in a B+tree of random keys whose pages are
  about half full under churn, and its slot in the presence table.

`stats()` reports the estimate and LMDB's own page counts side by side (`db_bytes`),
and tests/storage/test_engine_quota.py measures the whole directory with `du`.
Freed pages go to LMDB's free list and are reused by later transactions; the file
keeps its high-water mark, which under churn at the quota is the quota plus the pages
freed by the last few transactions (not yet reusable while a reader may see them).
"""

from __future__ import annotations

from collections.abc import Callable

from casbah.storage.engine.index import FILE, Env, Record, Txn, seq_key, seq_of, split_order_value

PAGE = 4096
#: LMDB keeps values up to about half a page in the leaf itself; larger ones take overflow pages.
LEAF_MAX = 2000
_NODE = 8 + 2  # node header + its slot in the page's index
#: `meta` is filled in random key order: pages split half-full, and eviction thins
#: them out (measured steady state under churn, docs/storage-engine.md).
_FILL = 0.45
#: `order` is appended to and evicted from its start: its pages are full.
_FILL_ORDER = 0.95
_RECORD = 25
_CHECK = 8  # the checksum in an `order` entry (check.py)


#: A key's slot in the presence table (16 bytes at 50-75 % load, presence.py).
_PRESENCE = 26


def _meta(key_len: int) -> float:
    return (key_len + _RECORD + _NODE) / _FILL + _PRESENCE


def charge_inline(key_len: int, length: int) -> int:
    value = 1 + key_len + _CHECK + length
    if value <= LEAF_MAX:
        return int(_meta(key_len) + (8 + value + _NODE) / _FILL_ORDER) + 1
    pages = -(-(value + 16) // PAGE)
    return int(_meta(key_len) + (8 + 8 + _NODE) / _FILL_ORDER) + 1 + pages * PAGE


def charge_file(key_len: int, blocks: int) -> int:
    return int(_meta(key_len) + (8 + 1 + key_len + _CHECK + _NODE) / _FILL_ORDER) + 1 + blocks


def remove_entry(env: Env, txn: Txn, key: bytes, record: Record,
                 file_path: Callable[[bytes], str], unlinks: list[str], replaced: bool = False) -> None:
    """Delete one entry's records in `txn`; a file's path goes to `unlinks` (removed after commit).
    An entry being `replaced` (a re-upload) keeps its `order` entry until the new record is
    visible (`Txn.retire`)."""
    txn.delete(key, db=env.meta)
    if replaced:
        txn.retire(seq_key(record.seq))
    else:
        txn.delete(seq_key(record.seq), db=env.order)
    if record.where == FILE:
        unlinks.append(file_path(key))


def evict(env: Env, txn: Txn, charged: int, target: int, protected: Callable[[bytes], bool],
          file_path: Callable[[bytes], str], unlinks: list[str]) -> tuple[int, int]:
    """Delete the oldest entries until `charged <= target`, skipping those `protected`
    says are being read or written; nothing when even that would not make room.
    Returns (new charged, entries removed)."""
    if charged <= target:
        return charged, 0
    original = charged
    cursor = txn.cursor(db=env.order)
    victims: list[tuple[bytes, bytes, Record | None]] = []
    ok = cursor.first()
    while ok and charged > target:
        skey = bytes(cursor.key())  # the object itself: the env is opened without `buffers`
        key, _data = split_order_value(cursor.value()[:256])
        ok = cursor.next()
        if protected(key):
            continue
        value = txn.get(key, db=env.meta)
        record = Record.unpack(value) if value is not None else None
        if record is None or record.seq != seq_of(skey):  # a stale entry: drop it too
            victims.append((skey, b"", None))
            continue
        victims.append((skey, key, record))
        charged -= record.charge
    cursor.close()
    if charged > target:
        return original, 0
    removed = 0
    for skey, key, record in victims:
        if record is None:
            txn.delete(skey, db=env.order)
            continue
        remove_entry(env, txn, key, record, file_path, unlinks)
        removed += 1
    return charged, removed
