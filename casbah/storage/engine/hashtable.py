"""The presence table's file: an open-addressing hash table of engine keys, mapped.

A 4 KiB header, then a little-endian u64 `fp` per slot, then a u64 `seq` per slot (kept
apart, so a probe of 8 slots reads one or two cache lines of fingerprints, and lookups
touch half the pages).  The fingerprint is the hash's first 8 bytes mixed with the size
and the digest function (bit 0 set marks a used slot: 63 bits); the slot a key starts
probing at comes from the next 8 bytes of the hash times a per-table random odd number,
so the fingerprint is independent of where it sits and two keys compared on one probe run
share it with odds of 2^-63 — a false "present" expected once in ~10^19 lookups of absent
digests — and clients cannot aim digests at one run of slots.  `seq` is the key's
position in `order` (FindMissingBlobs refreshes a blob from the oldest quarter).  Linear
probing, 16 bytes a slot, sized for 60 % load (any slot count, not a power of two).

`presence.py` keeps it exact and says why it exists.
"""

from __future__ import annotations

import mmap
import os
import secrets
import struct
from collections.abc import Sequence
from operator import itemgetter
from pathlib import Path

import numpy as np

from casbah.digest import Digest
from casbah.digest_batch import DigestArray

HEADER = 4096
MAGIC = b"CASBAHPT"
VERSION = 2
#: magic, version (2: fingerprints and positions apart; 1 interleaved them), (unused), slots, salt,
#: state, boot id, used, tombstones, retired, growing
_HDR = struct.Struct("<8sIIQQQ16sQQQQ")
STATE, BOOT, USED, TOMBS, RETIRED, GROWING = 32, 40, 56, 64, 72, 80  # byte offsets in the header
BUILDING, COMPLETE = 0, 1
EMPTY, TOMB = 0, 2
WORDS = 2
#: The first table: 1 MiB of file, so a growing store's first rebuilds come later.
MIN_SLOTS = 1 << 16
BUILD_LOAD = 0.6
MAX_LOAD = 0.75
MAX_PROBE = 64
#: Slots a vectorized probe step reads per digest.
WINDOW = 8
_STEPS = np.arange(WINDOW, dtype=np.int64)
_M = (1 << 64) - 1
_K_SIZE = 0x9E3779B97F4A7C15
_K_FUNC = 0xC2B2AE3D27D4EB4F


def this_boot() -> bytes:
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


_FUNCTION = itemgetter(2)


def digest_fingerprints(digests: Sequence[Digest]) -> tuple[np.ndarray, np.ndarray] | None:
    """(fingerprints, home words) of a batch of one digest function, as `key_fingerprint`
    computes them from keys; None for a mixed batch."""
    n = len(digests)
    if isinstance(digests, DigestArray):  # decoded already, from the request's bytes
        function, h, sizes = digests.function, digests.prefix, digests.sizes
    else:
        function = digests[0].function
        if len(set(map(_FUNCTION, digests))) != 1:
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
        #: Fingerprints, then positions: a probe of 8 slots reads one or two cache lines of `fps`.
        self.fps = np.frombuffer(self.mm, dtype=np.uint64, count=slots, offset=HEADER)
        self.seqs = np.frombuffer(self.mm, dtype=np.uint64, count=slots, offset=HEADER + 8 * slots)
        self._seq_base = HEADER // 8 + slots

    @staticmethod
    def create(path: Path, slots: int, state: int) -> None:
        """A new empty table at `path` (written aside and renamed: never seen half made).

        Its blocks are allocated now (`posix_fallocate`): a store on a full filesystem
        gets an OSError here, where a write through the mapping into a hole would kill
        the process with SIGBUS."""
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                size = HEADER + WORDS * 8 * slots
                f.truncate(size)
                os.posix_fallocate(f.fileno(), 0, size)
                f.write(_HDR.pack(MAGIC, VERSION, 0, slots, secrets.randbits(64) | 1, state, this_boot(), 0, 0, 0, 0))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def close(self) -> None:
        """Unmap now, or — while a lookup in another thread still reads it — when that
        lookup lets go (the mapping lives as long as an array over it)."""
        self.fps = self.seqs = np.empty(0, dtype=np.uint64)
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
        return self.get(STATE) == COMPLETE and not self.get(RETIRED)

    def boot_id(self) -> bytes:
        return bytes(self.mm[BOOT:BOOT + 16])

    def _start(self, home: int) -> int:
        return ((((home * self.salt) & _M) >> 32) * self.slots) >> 32

    def _find(self, fp: int, home: int) -> tuple[int, int]:
        """(slot holding the key or -1, first reusable slot on its run or -1)."""
        words, slots, free = self.words, self.slots, -1
        i = self._start(home)
        base = HEADER // 8
        for _ in range(slots):
            f = words[base + i]
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
            words[self._seq_base + at] = seq
            return True
        if free < 0:
            return False
        w = base + free
        if words[w] == TOMB:
            self.set(TOMBS, max(self.get(TOMBS) - 1, 0))
        words[self._seq_base + free] = seq
        words[w] = fp  # last: a reader sees the slot used once it is whole
        self.set(USED, self.get(USED) + 1)
        return True

    def fill(self, keys: Sequence[bytes], seqs: Sequence[int]) -> bool:
        """Insert or update many keys: the keys whose first slot is empty, one per slot, are
        written by numpy at once — a key whose first slot is empty cannot already be in
        the table, so nothing is written twice; all positions are written before any
        fingerprint, so a concurrent lookup never sees half a slot — and the rest one by
        one.  False: no room."""
        n = len(keys)
        if n == 0:
            return True
        h = np.frombuffer(b"".join([k[1:17] for k in keys]), dtype="<u8").reshape(n, 2)
        sizes = np.frombuffer(b"".join([k[-8:] for k in keys]), dtype=">u8").astype(np.uint64)
        functions = np.frombuffer(bytes([k[0] for k in keys]), dtype=np.uint8).astype(np.uint64)
        with np.errstate(over="ignore"):
            fp = (h[:, 0] ^ (sizes * np.uint64(_K_SIZE)) ^ (functions * np.uint64(_K_FUNC))) | np.uint64(1)
            start = ((((h[:, 1] * np.uint64(self.salt)) >> np.uint64(32)) * np.uint64(self.slots))
                     >> np.uint64(32)).astype(np.int64)
        _, first = np.unique(start, return_index=True)
        free = np.zeros(n, dtype=bool)
        free[first] = True
        free &= self.fps[start] == EMPTY
        at = start[free]
        self.seqs[at] = np.asarray(seqs, dtype=np.uint64)[free]
        self.fps[at] = fp[free]
        self.set(USED, self.get(USED) + int(free.sum()))
        for i in np.flatnonzero(~free).tolist():
            if not self.insert(keys[i], seqs[i]):
                return False
        return True

    def remove(self, key: bytes) -> None:
        at, _ = self._find(*key_fingerprint(key))
        if at >= 0:
            self.words[HEADER // 8 + at] = TOMB
            self.set(USED, max(self.get(USED) - 1, 0))
            self.set(TOMBS, self.get(TOMBS) + 1)

    def crowded(self) -> bool:
        return self.get(USED) + self.get(TOMBS) > self.slots * MAX_LOAD

    def lookup(self, fp: np.ndarray, home: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(found mask, seq of each found, indices the probe limit left to LMDB).

        Each step reads `WINDOW` consecutive fingerprints of every unresolved digest (one
        or two cache lines): a digest is found at its fingerprint before the first empty slot, absent
        at an empty slot first; at 60 % load nearly all resolve in the first step, where
        one slot a step took as many steps as the longest run (~50 at 10k keys)."""
        n = len(fp)
        fps, positions = self.fps, self.seqs
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
                seqs[todo[got]] = positions[where[got, pos[got]]]
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
