"""The engine's on-disk index: one LMDB environment, its named databases, record formats.

Databases (all in `<path>/index/data.mdb`):

- `meta`: key -> record (stored length, position in `order`, bytes charged to the
  quota, where the data is).  Small, so FindMissingBlobs touches only these pages.
- `order`: position (8 bytes, big-endian, from a counter) -> key length, key, and the
  bytes of a small blob (a large blob's entry holds only its key).  Always appended
  at the end (LMDB's append mode: pages filled completely, written sequentially),
  evicted from the start: the oldest entries go first, whole pages at a time.  A blob
  used while in the oldest quarter is copied to the end (Buildbarn's "refresh"), so
  what is used stays; the order is LRU-like without a write per use.
- `info`: named counters updated in the same transactions as the entries
  (`charged`, `seq`, `objects`, `layout`).

Keys are `function byte (the REAPI enum value) + raw hash + size (8 bytes)`: 41 bytes
for SHA-256.  The size is part of the key because a `verify: false` store (the
ActionCache) is keyed by an action digest, whose hash says nothing of the bytes.

LMDB refuses to open one environment twice in a process (its locks are per
process), so environments are shared by path with a reference count: two stores on
one directory in one process (tests, an admin command) share it.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import lmdb

from casbah.digest import Digest, DigestFunction
from casbah.errors import ResourceExhausted, from_os_error

INLINE = 0
FILE = 1

_RECORD = struct.Struct("<QQQB")  # length, position in `order`, charge, where
_U64 = struct.Struct(">Q")
_LE64 = struct.Struct("<Q")

#: Bumped when the layout changes; a store without it is migrated from the old layout.
LAYOUT = 3


_PREFIX = {function: bytes((function.proto_value,)) for function in DigestFunction}
_pack = _U64.pack
_fromhex = bytes.fromhex


def key_of(digest: Digest) -> bytes:
    """Hot (FindMissingBlobs calls it per digest): the prefix comes from a dict."""
    return _PREFIX[digest.function] + _fromhex(digest.hash) + _pack(digest.size)


def digest_of(key: bytes) -> Digest:
    function = DigestFunction.from_proto(key[0])
    return Digest(key[1:-8].hex(), _U64.unpack(key[-8:])[0], function)


@dataclass(slots=True)
class Record:
    length: int
    seq: int
    charge: int
    where: int

    def pack(self) -> bytes:
        return _RECORD.pack(self.length, self.seq, self.charge, self.where)

    @classmethod
    def unpack(cls, value: bytes) -> Record:
        return cls(*_RECORD.unpack(value))


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def seq_of(value: bytes) -> int:
    return _U64.unpack(value)[0]


def order_value(key: bytes, data: bytes | None) -> bytes:
    return bytes((len(key),)) + key + (data or b"")


def split_order_value(value: bytes) -> tuple[bytes, bytes]:
    """(key, inline data) of an `order` entry."""
    n = value[0]
    return bytes(value[1:1 + n]), bytes(value[1 + n:])


class Env:
    """One open LMDB environment and its databases (shared within a process)."""

    _open: dict[str, Env] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path, map_size: int, durable: bool) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.refs = 0
        try:
            self.env = lmdb.open(
                str(path), map_size=map_size, max_dbs=8, max_readers=1024, subdir=True,
                # Durable: every commit synced (data, then meta).  Fast (default): commits
                # are not synced; the engine syncs at most SYNC_INTERVAL after a commit
                # (docs/storage-engine.md says what a power failure can cost).
                sync=durable, metasync=durable, readahead=False, lock=True,
            )
        except lmdb.Error as exc:
            raise map_error(exc, f"the index in {path}")  # noqa: B904 - keeps the OSError cause
        self.meta = self.env.open_db(b"meta")
        self.order = self.env.open_db(b"order")
        self.info = self.env.open_db(b"info")

    @classmethod
    def acquire(cls, path: Path, map_size: int, durable: bool) -> Env:
        real = os.path.realpath(path)
        with cls._lock:
            env = cls._open.get(real)
            if env is None:
                env = cls._open[real] = Env(Path(real), map_size, durable)
            env.refs += 1
            return env

    def release(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs == 0:
                del self._open[str(self.path)]
                self.env.close()

    def counter(self, txn: lmdb.Transaction, name: bytes) -> int:
        value = txn.get(name, db=self.info)
        return _LE64.unpack(value)[0] if value is not None else 0

    def set_counter(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _LE64.pack(max(value, 0)), db=self.info)

    def page_bytes(self, txn: lmdb.Transaction) -> int:
        """Bytes of pages the four databases occupy now (not the file's high-water mark)."""
        total = 0
        for db in (self.meta, self.order, self.info):
            s = txn.stat(db)
            total += (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"]
        return total


def map_error(exc: Exception, what: str) -> Exception:
    """A full map or filesystem under LMDB is RESOURCE_EXHAUSTED; anything else stays."""
    if isinstance(exc, lmdb.MapFullError):
        return ResourceExhausted(f"{what} is full (its map size is reached)")
    if isinstance(exc, lmdb.DiskError | lmdb.Error) and _is_no_space(exc):
        return from_os_error(OSError(errno.ENOSPC, str(exc)), what)
    return exc


def _is_no_space(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, lmdb.DiskError) or "No space left" in text or "Disk quota exceeded" in text
