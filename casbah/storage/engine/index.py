"""The engine's on-disk index: two LMDB environments, their databases, record formats.

`<path>/meta/` (small, read by every FindMissingBlobs; kept apart so its pages stay
in the page cache instead of being evicted with the data pages, docs/storage-engine.md):

- `meta`: key -> record (stored length, position in `order`, bytes charged to the
  quota, where the data is).
- `info`: named counters updated in the same transactions as the records
  (`charged`, `objects`, `layout`).

`<path>/index/` (the bulk: inline blob data):

- `order`: position (8 bytes, big-endian, from a counter) -> key length, key, the
  blob's checksum (XXH3-64, check.py; absent in entries older code wrote), and the
  bytes of a small blob (a large blob's entry holds only its key and checksum).  Always appended
  at the end (LMDB's append mode: pages filled completely, written sequentially),
  evicted from the start: the oldest entries go first, whole pages at a time.  A blob
  used while in the oldest quarter is copied to the end (Buildbarn's "refresh"), so
  what is used stays; the order is LRU-like without a write per use (no refresh while
  the store is under half its quota: `Upkeep._boundary`).
- `info`: `seq`, the last position handed out (kept with `order`, so a crash between
  the two commits can never hand out a position twice).

A transaction spans both environments (`Txn`).  Writes lock `order` first, then
`meta`
(always in that order: no deadlock between processes), and commit `order` first, then
`meta`: the `meta` commit makes a write visible.  Reads begin on `meta`, then `order`.
So a crash between the commits leaves at worst an `order` entry no record points at (an
orphan: eviction and scrub delete it) or a record whose `order` entry is gone (dangling:
read as missing and dropped), never a record pointing at the wrong bytes.

Keys are `function byte (the REAPI enum value) + raw hash + size (8 bytes)`: 41 bytes
for SHA-256.  The size is part of the key because a `verify: false` store (the
ActionCache) is keyed by an action digest, whose hash says nothing of the bytes.

LMDB refuses to open one environment twice in a process (its locks are per
process), so environments are shared by path with a reference count: two stores on
one directory in one process (tests, an admin command) share them.
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
from casbah.errors import ResourceExhausted, Unavailable, from_os_error
from casbah.storage.engine.presence import Presence
from casbah.storage.engine.txn import Txn

INLINE = 0
FILE = 1

_RECORD = struct.Struct("<QQQB")  # length, position in `order`, charge, where
_U64 = struct.Struct(">Q")
_LE64 = struct.Struct("<Q")

#: Bumped when the layout changes; a store without it is migrated from the old layout.
LAYOUT = 4


def layout_mark() -> bytes:
    return _LE64.pack(LAYOUT)


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
    def unpack(cls, value: bytes | memoryview) -> Record:
        return cls(*_RECORD.unpack(value))


def seq_key(seq: int) -> bytes:
    return _U64.pack(seq)


def seq_of(value: bytes | memoryview) -> int:
    return _U64.unpack(value)[0]


#: In an `order` entry's key-length byte: an 8-byte checksum (check.py) follows the key.
#: Keys are at most 73 bytes (function, SHA-512 hash, size), so the bit is free; entries
#: written before it existed have it clear and are verified by the digest function.
CHECKED = 0x80
_KEY_LEN = 0x7F


def order_value(key: bytes, data: bytes | None, check: bytes | None = None) -> bytes:
    """An `order` entry: key length (| CHECKED), key, [checksum], inline data."""
    if check is None:
        return bytes((len(key),)) + key + (data or b"")
    return bytes((len(key) | CHECKED,)) + key + check + (data or b"")


def split_order_value(value: bytes | memoryview) -> tuple[bytes, bytes]:
    """(key, inline data) of an `order` entry."""
    key, _check, data = split_checked(value)
    return key, data


def inline_of(entry: bytes | memoryview, key: bytes) -> tuple[bytes | None, bytes] | None:
    """Hot (every inline read): (checksum or None, the data copied out) of an `order`
    entry, which may be a view into the map; None when the entry holds another key."""
    head = entry[0]
    n = head & _KEY_LEN
    if entry[1:1 + n] != key:
        return None
    if head & CHECKED:
        return bytes(entry[1 + n:9 + n]), bytes(entry[9 + n:])
    return None, bytes(entry[1 + n:])


def split_checked(value: bytes | memoryview) -> tuple[bytes, bytes | None, bytes]:
    """(key, checksum or None for an entry written without one, inline data)."""
    head = value[0]
    n = head & _KEY_LEN
    if head & CHECKED:
        return bytes(value[1:1 + n]), bytes(value[1 + n:9 + n]), bytes(value[9 + n:])
    return bytes(value[1:1 + n]), None, bytes(value[1 + n:])


def _open_env(path: Path, map_size: int, durable: bool, readahead: bool) -> lmdb.Environment:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return lmdb.open(
            str(path), map_size=map_size, max_dbs=8, max_readers=1024, subdir=True,
            # Durable: every commit synced (data, then meta).  Fast (default): commits
            # are not synced; the engine syncs at most SYNC_INTERVAL after a commit
            # (docs/storage-engine.md says what a power failure can cost).
            sync=durable, metasync=durable, readahead=readahead, lock=True,
        )
    except lmdb.Error as exc:
        raise map_error(exc, f"the index in {path}")  # noqa: B904 - keeps the OSError cause


class Env:
    """The two open LMDB environments of a store and their databases (shared within a process)."""

    _open: dict[str, Env] = {}
    _lock = threading.Lock()

    def __init__(self, root: Path, map_size: int, durable: bool) -> None:
        self.path = root
        self.refs = 0
        # `index` is read one blob at a time, at random: readahead around a fault would read
        # pages nobody asked for.  `meta` is small and all of it is wanted in the page cache:
        # readahead brings it in with a few faults (measured: docs/storage-engine.md).
        self.data_env = _open_env(root / "index", map_size, durable, readahead=False)
        try:
            self.meta_env = _open_env(root / "meta", map_size, durable, readahead=True)
        except BaseException:
            self.data_env.close()
            raise
        #: The presence table (`presence.py`), opened by the engine once the layout is current.
        self.presence: Presence | None = None
        self.order = self.data_env.open_db(b"order")
        self.seqs = self.data_env.open_db(b"info")
        self.meta = self.meta_env.open_db(b"meta")
        self.info = self.meta_env.open_db(b"info")

    @classmethod
    def acquire(cls, root: Path, map_size: int, durable: bool) -> Env:
        real = os.path.realpath(root)
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
                if self.presence is not None:
                    self.presence.close()
                    self.presence = None
                self.data_env.close()
                self.meta_env.close()

    def begin(self, write: bool = False, buffers: bool = False) -> Txn:
        """`buffers`: a read whose `index` values are views into the map (valid until the
        transaction ends), for a reader that copies only the part it keeps."""
        return Txn(self, write, buffers)

    def open_presence(self) -> Presence:
        """The store's presence table (one per environment; made and filled if absent)."""
        with self._lock:
            if self.presence is None:
                self.presence = Presence(self.path / "meta", self._keys_after, self._objects)
            return self.presence

    def _keys_after(self, after: bytes, n: int) -> list[tuple[bytes, int]]:
        """Up to `n` (key, position in `order`) of `meta` after `after`, one read transaction."""
        rows: list[tuple[bytes, int]] = []
        with self.meta_env.begin(db=self.meta) as txn:
            cursor = txn.cursor()
            ok = cursor.set_range(after) if after else cursor.first()
            if ok and after and cursor.key() == after:
                ok = cursor.next()
            while ok and len(rows) < n:
                rows.append((cursor.key(), _LE64.unpack_from(cursor.value(), 8)[0]))
                ok = cursor.next()
        return rows

    def _objects(self) -> int:
        with self.meta_env.begin(db=self.info) as txn:
            value = txn.get(b"objects")
        return _LE64.unpack(value)[0] if value is not None else 0

    def sync(self) -> None:
        self.data_env.sync(True)
        self.meta_env.sync(True)

    def counter(self, txn: Txn, name: bytes) -> int:
        value = txn.get(name, db=self.seqs if name == b"seq" else self.info)
        return _LE64.unpack(value)[0] if value is not None else 0

    def set_counter(self, txn: Txn, name: bytes, value: int) -> None:
        txn.put(name, _LE64.pack(max(value, 0)), db=self.seqs if name == b"seq" else self.info)

    def page_bytes(self, txn: Txn, dbs: tuple = ()) -> int:
        """Bytes of pages the databases occupy now (not the files' high-water marks)."""
        total = 0
        for db in dbs or (self.meta, self.info, self.order, self.seqs):
            s = txn.stat(db)
            total += (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) * s["psize"]
        return total

    def file_bytes(self) -> int:
        return sum((e.info()["last_pgno"] + 1) * 4096 for e in (self.data_env, self.meta_env))

    def map_size(self) -> int:
        return self.data_env.info()["map_size"]


def map_error(exc: Exception, what: str, root: Path | None = None) -> Exception:
    """A full map or filesystem under LMDB is RESOURCE_EXHAUSTED naming its cause (the
    LMDB error, or the OS error LMDB got, as `__cause__` and in the message).  An I/O
    error (EIO: LMDB's commit on a filesystem that filled up under it reports that, seen
    in the soak on a full tmpfs) is RESOURCE_EXHAUSTED when `root`'s filesystem has no
    room left, else UNAVAILABLE (the disk failed; nothing was committed).  Anything else
    stays."""
    if isinstance(exc, lmdb.MapFullError):
        err = ResourceExhausted(f"{what} is full: its LMDB map size is reached (the `map-size` option "
                                "sets it; deleting blobs frees pages)")
        err.__cause__ = exc
        return err
    code = getattr(exc, "code", 0)
    if isinstance(exc, lmdb.Error) and (code in _NO_SPACE or _is_no_space(exc)):
        cause = OSError(code if code in _NO_SPACE else errno.ENOSPC,
                        os.strerror(code if code in _NO_SPACE else errno.ENOSPC))
        cause.__cause__ = exc
        return from_os_error(cause, what)
    if isinstance(exc, lmdb.Error) and (code == errno.EIO or "Input/output error" in str(exc)):
        if root is not None and _full(root):
            cause = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            cause.__cause__ = exc
            return from_os_error(cause, what)
        failed = Unavailable(f"{what}: the disk reported an I/O error ({exc}); nothing was written, retry later")
        failed.__cause__ = exc
        return failed
    return exc


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: Free bytes under which a filesystem counts as full (LMDB needs whole pages, files whole blocks).
_FULL_BELOW = 1 << 20


def _full(root: Path) -> bool:
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BELOW


def _is_no_space(exc: Exception) -> bool:
    text = str(exc)
    return isinstance(exc, lmdb.DiskError) or "No space left" in text or "Disk quota exceeded" in text
