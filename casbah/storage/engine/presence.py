"""The presence table: an exact hash table of the keys in `meta`, shared by every process.

Why: FindMissingBlobs asks about a thousand digests a call, and in a B+tree of ten million
keys each lookup walks four levels of pages scattered over a gigabyte — measured at
2-3 µs a digest, five times the cost at ten thousand blobs.  A hash table answers in one
or two cache lines whatever the count, and numpy probes a whole batch at once.  The table
is a file (`<path>/meta/presence`) mapped by every process: memory the kernel manages,
bounded by the page cache, not by the process.

Layout: a 4 KiB header, then slots of two little-endian u64: `fp` and `seq`.  The
fingerprint is the hash's first 8 bytes mixed with the size and the digest function (bit 0
set marks a used slot: 63 bits); the slot a key starts probing at comes from the next 8
bytes of the hash times a per-table random odd number, so the fingerprint is independent
of where it sits and two keys compared on one probe run share it with odds of 2^-63 — a
false "present" expected once in ~10^19 lookups of absent digests — and clients cannot aim
digests at one run of slots.  `seq` is the key's position in `order` (FindMissingBlobs
refreshes a blob from the oldest quarter).  Open addressing, linear probing, 16 bytes a
slot, sized for 60 % load (any slot count, not a power of two: ~27 bytes a key on disk).

Exactness, across processes and crashes.  Every write transaction on `meta` holds the
table's lock (`Presence.lock`: a thread lock plus `flock` on `presence.lock`) from before
LMDB's write lock until after the table is updated; a key is removed from the table
*before* `meta` commits its deletion and inserted *after* `meta` commits it.  So what the
table holds is always in `meta`: a crash between the two steps only leaves a present key
out of the table (then FindMissingBlobs reports it missing, the client uploads it again,
and the write puts it back) — never a present answer for an absent blob.  A power
failure can lose recent commits of `meta` (the fast mode) while the table's pages
survive, or the reverse: a table written before this boot is rebuilt (its header keeps
the kernel's boot id).

Lifecycle.  A store without a table (new, upgraded, or after a reboot) gets an empty one
marked BUILDING; a background thread fills it from `meta` in chunks, each under the lock
(so no write interleaves with a chunk), then marks it COMPLETE.  Only a COMPLETE table
answers; until then lookups go to LMDB.  When used plus deleted slots pass 70 %, a
larger table is built beside it (`presence.next`, filled the same way while writers
update both) and renamed over it; the old one is marked retired, and every process
reopens the new one on its next use.  A probe run longer than `MAX_PROBE` is answered by
LMDB; an insert that finds no slot marks the table BUILDING until the next one is ready.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import secrets
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from operator import itemgetter
from pathlib import Path

import numpy as np

from casbah.digest import Digest

log = logging.getLogger(__name__)

HEADER = 4096
MAGIC = b"CASBAHPT"
VERSION = 1
#: magic, version, (unused), slots, salt, state, boot id, used, tombstones, retired, growing
_HDR = struct.Struct("<8sIIQQQ16sQQQQ")
_STATE, _BOOT, _USED, _TOMBS, _RETIRED, _GROWING = 32, 40, 56, 64, 72, 80  # byte offsets in the header
BUILDING, COMPLETE = 0, 1
EMPTY, TOMB = 0, 2
WORDS = 2
MIN_SLOTS = 1 << 12
BUILD_LOAD = 0.6
MAX_LOAD = 0.75
MAX_PROBE = 64
#: Slots a vectorized probe step reads per digest.
WINDOW = 8
_STEPS = np.arange(WINDOW, dtype=np.int64)
#: Keys a background fill inserts per lock hold (a few ms: writers wait at most that).
FILL_CHUNK = 5000
_M = (1 << 64) - 1
_K_SIZE = 0x9E3779B97F4A7C15
_K_FUNC = 0xC2B2AE3D27D4EB4F
_U64 = struct.Struct("<Q")


def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return bytes.fromhex(f.read().strip().replace(b"-", b"").decode())[:16].ljust(16, b"\0")
    except (OSError, ValueError):
        return b"\0" * 16


def key_fingerprint(key: bytes) -> tuple[int, int]:
    """(fingerprint, home word) of an engine key (function byte, raw hash, 8-byte big-endian size)."""
    size = int.from_bytes(key[-8:], "big")
    fp = (int.from_bytes(key[1:9], "little") ^ ((size * _K_SIZE) & _M) ^ ((key[0] * _K_FUNC) & _M)) | 1
    return fp, int.from_bytes(key[9:17], "little")


def digest_fingerprints(digests: Sequence[Digest]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fingerprints, home words) of a batch of one digest function, as `key_fingerprint`
    computes them from keys; None for a mixed batch."""
    n = len(digests)
    function = digests[0].function
    if any(d.function is not function for d in digests):
        return None
    raw = bytes.fromhex("".join(map(itemgetter(0), digests)))
    h = np.frombuffer(raw, dtype=np.uint8).reshape(n, len(raw) // n)[:, :16].copy().view("<u8")
    sizes = np.fromiter(map(itemgetter(1), digests), dtype=np.uint64, count=n)
    with np.errstate(over="ignore"):
        fp = h[:, 0] ^ (sizes * np.uint64(_K_SIZE)) ^ np.uint64((function.proto_value * _K_FUNC) & _M)
    return fp | np.uint64(1), h[:, 1]


class Table:
    """One table file, mapped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.ino = os.fstat(fd).st_ino
            self.mm = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        magic, version, _, slots, salt, *_ = _HDR.unpack_from(self.mm, 0)
        if magic != MAGIC or version != VERSION or len(self.mm) != HEADER + WORDS * 8 * slots:
            self.mm.close()
            raise ValueError(f"{path}: not a presence table of this version")
        self.slots = slots
        self.salt = salt
        self._view = memoryview(self.mm)
        self.words = self._view.cast("Q")  # header words first (HEADER // 8 of them)
        self.array = np.frombuffer(self.mm, dtype=np.uint64, offset=HEADER).reshape(slots, WORDS)

    @staticmethod
    def create(path: Path, slots: int, state: int) -> None:
        """A new empty table at `path` (written aside and renamed: never seen half made)."""
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.truncate(HEADER + WORDS * 8 * slots)  # sparse: blocks come as slots are used
            f.write(_HDR.pack(MAGIC, VERSION, 0, slots, secrets.randbits(64) | 1, state, _boot_id(), 0, 0, 0, 0))
        os.replace(tmp, path)

    def close(self) -> None:
        """Unmap now, or — while a lookup in another thread still reads it — when that
        lookup lets go (the mapping lives as long as an array over it)."""
        self.array = np.empty((0, WORDS), dtype=np.uint64)
        try:
            self.words.release()
            self._view.release()
            self.mm.close()
        except BufferError:
            pass

    def get(self, offset: int) -> int:
        return int(self.words[offset // 8])

    def set(self, offset: int, value: int) -> None:
        self.words[offset // 8] = value

    @property
    def usable(self) -> bool:
        return self.get(_STATE) == COMPLETE and not self.get(_RETIRED)

    def boot_id(self) -> bytes:
        return bytes(self.mm[_BOOT:_BOOT + 16])

    def _start(self, home: int) -> int:
        return ((((home * self.salt) & _M) >> 32) * self.slots) >> 32

    def _find(self, fp: int, home: int) -> tuple[int, int]:
        """(slot holding the key or -1, first reusable slot on its run or -1)."""
        words, slots, free = self.words, self.slots, -1
        i = self._start(home)
        base = HEADER // 8
        for _ in range(slots):
            f = words[base + i * WORDS]
            if f == EMPTY:
                return -1, i if free < 0 else free
            if f == TOMB:
                if free < 0:
                    free = i
            elif f == fp:
                return i, free
            i = i + 1 if i + 1 < slots else 0
        return -1, free

    def insert(self, key: bytes, seq: int) -> bool:
        """Add or update `key` (False: no room — the table must be rebuilt)."""
        fp, home = key_fingerprint(key)
        at, free = self._find(fp, home)
        words, base = self.words, HEADER // 8
        if at >= 0:
            words[base + at * WORDS + 1] = seq
            return True
        if free < 0:
            return False
        w = base + free * WORDS
        if words[w] == TOMB:
            self.set(_TOMBS, max(self.get(_TOMBS) - 1, 0))
        words[w + 1] = seq
        words[w] = fp  # last: a reader sees the slot used once it is whole
        self.set(_USED, self.get(_USED) + 1)
        return True

    def remove(self, key: bytes) -> None:
        at, _ = self._find(*key_fingerprint(key))
        if at >= 0:
            self.words[HEADER // 8 + at * WORDS] = TOMB
            self.set(_USED, max(self.get(_USED) - 1, 0))
            self.set(_TOMBS, self.get(_TOMBS) + 1)

    def crowded(self) -> bool:
        return self.get(_USED) + self.get(_TOMBS) > self.slots * MAX_LOAD

    def lookup(self, fp: np.ndarray, home: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, seq of each found, indices the probe limit left to LMDB).

        Each step reads `WINDOW` consecutive slots of every unresolved digest (two cache
        lines): a digest is found at its fingerprint before the first empty slot, absent
        at an empty slot first; at 60 % load nearly all resolve in the first step, where
        one slot a step took as many steps as the longest run (~50 at 10k keys)."""
        n = len(fp)
        table = self.array
        fps = table[:, 0]
        size = self.slots
        with np.errstate(over="ignore"):
            start = (((home * np.uint64(self.salt)) >> np.uint64(32)) * np.uint64(size)) >> np.uint64(32)
        start = start.astype(np.int64)
        found = np.zeros(n, dtype=bool)
        seqs = np.zeros(n, dtype=np.uint64)
        todo = np.arange(n)
        for _ in range(MAX_PROBE // WINDOW):
            where = start[:, None] + _STEPS
            where[where >= size] -= size
            f = fps[where]  # (k, WINDOW)
            hit = f == fp[:, None]
            ends = hit | (f == EMPTY)  # the run ends at the key or at an empty slot
            pos = ends.argmax(axis=1)
            rows = np.arange(len(pos))
            got = hit[rows, pos]
            if got.any():
                found[todo[got]] = True
                seqs[todo[got]] = table[where[got, pos[got]], 1]
            more = ~ends[rows, pos]
            if not more.any():
                return found, seqs, todo[:0]
            todo, fp = todo[more], fp[more]
            start = start[more] + WINDOW
            start[start >= size] -= size
        return found, seqs, todo


def slots_for(count: int) -> int:
    """Slots for `count` keys at `BUILD_LOAD` (room to grow before the next rebuild)."""
    return max(MIN_SLOTS, int(count / BUILD_LOAD) + 1)


class Presence:
    """The table of one store, its lock, and its upkeep (one per `Env`, shared by threads)."""

    def __init__(self, root: Path, keys: Callable[[bytes, int], list[tuple[bytes, int]]],
                 count: Callable[[], int]) -> None:
        """`keys(after, n)`: up to n (key, seq) of `meta` after `after`, read in the caller's
        lock hold; `count()`: how many keys `meta` holds."""
        self.root = root
        self.path = root / "presence"
        self.next_path = root / "presence.next"
        self._keys = keys
        self._count = count
        self._thread_lock = threading.RLock()
        self._lock_fd = os.open(root / "presence.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._depth = 0
        self.table: Table | None = None
        self.next: Table | None = None
        self._filler: threading.Thread | None = None
        self._closed = False
        with self.locked():
            self._open()

    # -- the lock --------------------------------------------------------------------

    def acquire(self) -> None:
        self._thread_lock.acquire()
        self._depth += 1
        if self._depth == 1:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            self._follow()

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        self._thread_lock.release()

    def locked(self) -> _Held:
        return _Held(self)

    # -- opening, following a rebuild -----------------------------------------------

    def _open(self) -> None:
        """Under the lock: open the table, or make one (and fill it in the background)."""
        table = None
        try:
            table = Table(self.path)
            if table.boot_id() != _boot_id() or table.get(_RETIRED):
                log.info("presence table %s predates this boot (or was retired): rebuilding", self.path)
                table.close()
                table = None
        except (OSError, ValueError):
            table = None
        if table is None:
            count = self._count()
            Table.create(self.path, slots_for(count), COMPLETE if count == 0 else BUILDING)
            table = Table(self.path)
        self.table = table
        self._open_next()
        self._maybe_fill()

    def _open_next(self) -> None:
        if self.next is not None:
            self.next.close()
            self.next = None
        if self.table is not None and self.table.get(_GROWING):
            try:
                self.next = Table(self.next_path)
            except (OSError, ValueError):
                self.table.set(_GROWING, 0)  # its builder died before it existed

    def _follow(self) -> None:
        """Under the lock: reopen what another process swapped or started."""
        table = self.table
        if table is None:
            return
        if table.get(_RETIRED) or os.stat(self.path).st_ino != table.ino:
            table.close()
            self.table = None
            self._open()
            return
        growing = bool(table.get(_GROWING))
        if growing != (self.next is not None):
            self._open_next()

    def check(self) -> Table | None:
        """The table if lookups may use it now (cheap: a few words of the header)."""
        table = self.table
        if table is None or not table.usable:
            if table is not None and table.get(_RETIRED):
                with self.locked():
                    pass  # _follow() reopened it
                table = self.table
                return table if table is not None and table.usable else None
            return None
        return table

    # -- writes (the caller holds the lock) --------------------------------------------

    def removed(self, keys: Iterable[bytes]) -> None:
        for table in self._tables():
            for key in keys:
                table.remove(key)

    def added(self, items: Iterable[tuple[bytes, int]]) -> None:
        for table in self._tables():
            for key, seq in items:
                if not table.insert(key, seq):
                    table.set(_STATE, BUILDING)  # incomplete until the next table replaces it
                    break
        self._maybe_fill()

    def _tables(self) -> list[Table]:
        return [t for t in (self.table, self.next) if t is not None]

    # -- filling in the background ---------------------------------------------------

    def _maybe_fill(self) -> None:
        table = self.table
        if table is None or self._closed or (self._filler is not None and self._filler.is_alive()):
            return
        if table.get(_STATE) == COMPLETE and not table.crowded() and not table.get(_GROWING):
            return
        self._filler = threading.Thread(target=self._fill, name="casbah-presence", daemon=True)
        self._filler.start()

    def _fill(self) -> None:
        """Fill an incomplete table in place, or build the next one and swap it in."""
        try:
            build_fd = os.open(self.root / "presence.build", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            return
        try:
            try:
                fcntl.flock(build_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # another process builds
            with self.locked():
                table = self.table
                if table is None:
                    return
                if table.get(_STATE) == COMPLETE and not table.crowded():
                    return
                if table.get(_STATE) == BUILDING and not table.crowded() and not table.get(_GROWING):
                    target = table  # fill in place
                else:
                    Table.create(self.next_path, slots_for(self._count()), BUILDING)
                    table.set(_GROWING, 1)
                    self._open_next()
                    target = None
            self._copy_meta(target)
        except Exception:  # a failed build only leaves lookups on LMDB
            log.exception("presence table %s: rebuilding failed; FindMissingBlobs reads the index", self.path)
        finally:
            os.close(build_fd)

    def _copy_meta(self, target: Table | None) -> None:
        after = b""
        while not self._closed:
            with self.locked():
                table = target if target is not None else self.next
                if table is None:
                    return
                rows = self._keys(after, FILL_CHUNK)
                for key, seq in rows:
                    if not table.insert(key, seq):
                        raise RuntimeError("presence table full while being filled")
                if len(rows) == FILL_CHUNK:
                    after = rows[-1][0]
                    continue
                table.set(_STATE, COMPLETE)
                if target is None:
                    self._swap()
                log.info("presence table %s: complete (%d keys)", self.path, table.get(_USED))
                return

    def _swap(self) -> None:
        """Under the lock: the filled next table becomes the table."""
        assert self.next is not None and self.table is not None
        os.replace(self.next_path, self.path)
        old, self.table, self.next = self.table, self.next, None
        old.set(_RETIRED, 1)
        old.close()

    def close(self) -> None:
        self._closed = True
        if self._filler is not None:
            self._filler.join(timeout=10)
        with self.locked():
            for table in self._tables():
                table.close()
            self.table = self.next = None
        os.close(self._lock_fd)


class _Held:
    __slots__ = ("_p",)

    def __init__(self, presence: Presence) -> None:
        self._p = presence

    def __enter__(self) -> Presence:
        self._p.acquire()
        return self._p

    def __exit__(self, *exc: object) -> None:
        self._p.release()
