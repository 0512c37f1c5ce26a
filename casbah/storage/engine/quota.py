"""What each entry costs on disk, and eviction by last-use generation.

The quota counts bytes really used on disk, estimated per entry when it is written
(so eviction needs no scan) and kept as a running total (`info/charged`) in the same
transactions as the entries:

- an inline value up to `LEAF_MAX` bytes shares leaf pages with others: its bytes
  plus LMDB's per-node overhead, divided by the fill factor of a B+tree filled in
  random key order (pages split half-full and fill up to full: ~0.7 on average);
- a larger inline value takes whole overflow pages (4 KiB each, a 16-byte header);
- a file takes its blocks (`st_blocks * 512`, measured after the write);
- every entry also has its `meta` and `lru` records (leaf entries, as above).

`stats()` reports the estimate and LMDB's own page counts side by side (`db_bytes`),
and tests/storage/test_engine_quota.py measures the whole directory with `du`.
Freed pages go to LMDB's free list and are reused by later transactions; the file
keeps its high-water mark, which under churn at the quota is the quota plus the pages
freed by the last few transactions (not yet reusable while a reader may see them).
"""

from __future__ import annotations

from collections.abc import Callable

import lmdb

from casbah.storage.engine.index import FILE, INLINE, Env, Record, lru_key, split_lru_key

PAGE = 4096
#: LMDB keeps values up to about half a page... minus headers in the leaf itself.
LEAF_MAX = 2000
_NODE = 8 + 2  # node header + its slot in the page's index
_FILL = 0.45
_RECORD = 25


def leaf(key_len: int, value_len: int) -> float:
    return (key_len + value_len + _NODE) / _FILL


def charge_inline(key_len: int, length: int) -> int:
    bookkeeping = leaf(key_len, _RECORD) + leaf(key_len + 8, 0)
    if length <= LEAF_MAX:
        return int(bookkeeping + leaf(key_len, length)) + 1
    pages = -(-(length + 16) // PAGE)
    return int(bookkeeping + leaf(key_len, 8)) + 1 + pages * PAGE


def charge_file(key_len: int, blocks: int) -> int:
    return int(leaf(key_len, _RECORD) + leaf(key_len + 8, 0)) + 1 + blocks


def remove_entry(env: Env, txn: lmdb.Transaction, key: bytes, record: Record,
                 file_path: Callable[[bytes], str], unlinks: list[str]) -> None:
    """Delete one entry's records in `txn`; a file's path goes to `unlinks` (removed after commit)."""
    txn.delete(key, db=env.meta)
    txn.delete(lru_key(record.gen, key), db=env.lru)
    if record.where == INLINE:
        txn.delete(key, db=env.inline)
    elif record.where == FILE:
        unlinks.append(file_path(key))


def evict(env: Env, txn: lmdb.Transaction, charged: int, target: int, protected: Callable[[bytes], bool],
          file_path: Callable[[bytes], str], unlinks: list[str]) -> tuple[int, int]:
    """Delete the least recently used entries until `charged <= target`, skipping those
    `protected` says are being read or written.  Returns (new charged, entries removed)."""
    removed = 0
    original = charged
    if charged <= target:
        return charged, 0
    cursor = txn.cursor(db=env.lru)
    victims: list[tuple[bytes, bytes]] = []
    ok = cursor.first()
    while ok and charged > target:
        lkey = cursor.key()
        _gen, key = split_lru_key(lkey)
        ok = cursor.next()
        if protected(key):
            continue
        value = txn.get(key, db=env.meta)
        if value is None:  # a stale order entry: drop it too
            victims.append((lkey, b""))
            continue
        record = Record.unpack(value)
        victims.append((lkey, key))
        charged -= record.charge
        removed += 1
    cursor.close()
    if charged > target:  # even all it may evict would not make room: evict nothing
        return original, 0
    for lkey, key in victims:
        if not key:
            txn.delete(lkey, db=env.lru)
            continue
        record = Record.unpack(txn.get(key, db=env.meta))
        remove_entry(env, txn, key, record, file_path, unlinks)
    return charged, removed
