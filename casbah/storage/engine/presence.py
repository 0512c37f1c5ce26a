"""The presence table: an exact hash table of the keys in `meta`, shared by every process.

Why: FindMissingBlobs asks about a thousand digests a call, and in a B+tree of ten million
keys each lookup walks four levels of pages scattered over a gigabyte — measured at
2-3 µs a digest, five times the cost at ten thousand blobs.  A hash table answers in one
or two cache lines whatever the count, and numpy probes a whole batch at once.  The table
is a file (`<path>/meta/presence`) mapped by every process: memory the kernel manages,
bounded by the page cache, not by the process.

The table's file and its probing: `hashtable.py`.

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
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from casbah.storage.engine.hashtable import (
    BUILD_LOAD,
    BUILDING,
    COMPLETE,
    GROWING,
    RETIRED,
    STATE,
    USED,
    Table,
    slots_for,
    this_boot,
)

log = logging.getLogger(__name__)

#: Keys a background fill inserts per lock hold (a few ms: writers wait at most that).
FILL_CHUNK = 5000
#: Keys a commit adds from which numpy inserts them (`Table.fill`) rather than one at a time.
FILL_MIN = 32


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
        self._next_try = 0.0
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
            if table.boot_id() != this_boot() or table.get(RETIRED):
                log.info("presence table %s predates this boot (or was retired): rebuilding", self.path)
                table.close()
                table = None
        except (OSError, ValueError):
            table = None
        if table is None:
            count = self._count()
            try:
                Table.create(self.path, slots_for(count), COMPLETE if count == 0 else BUILDING)
                table = Table(self.path)
            except OSError as exc:  # a full disk: the store works without it, lookups in `meta`
                log.warning("presence table %s cannot be made (%s): FindMissingBlobs reads the index until "
                            "the next start", self.path, exc)
                return
        self.table = table
        self._open_next()
        self._maybe_fill()

    def _open_next(self) -> None:
        if self.next is not None:
            self.next.close()
            self.next = None
        if self.table is not None and self.table.get(GROWING):
            try:
                self.next = Table(self.next_path)
            except (OSError, ValueError):
                self.table.set(GROWING, 0)  # its builder died before it existed

    def _follow(self) -> None:
        """Under the lock: reopen what another process swapped or started."""
        table = self.table
        if table is None:
            return
        if table.get(RETIRED) or os.stat(self.path).st_ino != table.ino:
            table.close()
            self.table = None
            self._open()
            return
        growing = bool(table.get(GROWING))
        if growing != (self.next is not None):
            self._open_next()

    def check(self) -> Table | None:
        """The table if lookups may use it now (cheap: a few words of the header)."""
        table = self.table
        if table is None or not table.usable:
            if table is not None and table.get(RETIRED):
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

    def added(self, items: dict[bytes, int]) -> None:
        keys, seqs = list(items), list(items.values())
        for table in self._tables():
            if not (table.fill(keys, seqs) if len(keys) >= FILL_MIN else
                    all(table.insert(key, seq) for key, seq in zip(keys, seqs, strict=True))):
                table.set(STATE, BUILDING)  # incomplete until the next table replaces it
        self._maybe_fill()

    def _tables(self) -> list[Table]:
        return [t for t in (self.table, self.next) if t is not None]

    # -- filling in the background ---------------------------------------------------

    def _maybe_fill(self) -> None:
        table = self.table
        if table is None or self._closed or (self._filler is not None and self._filler.is_alive()):
            return
        if table.get(STATE) == COMPLETE and not table.crowded() and not table.get(GROWING):
            return
        if time.monotonic() < self._next_try:
            return  # another process is building: do not start a thread per write to find that out
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
                self._next_try = time.monotonic() + 1.0
                return  # another process builds
            with self.locked():
                table = self.table
                if table is None:
                    return
                # (With the build lock held, a GROWING mark is a dead builder's: build anew.)
                if table.get(STATE) == COMPLETE and not table.crowded() and not table.get(GROWING):
                    return
                if table.get(STATE) == BUILDING and not table.crowded() and not table.get(GROWING):
                    target = table  # fill in place
                else:
                    slots = slots_for(self._count())
                    if table.get(USED) > table.slots * BUILD_LOAD:  # growing, not clearing tombstones:
                        slots = max(slots, table.slots * 3 // 2)  # rebuilds O(log n) times, ~3n inserts in all
                    Table.create(self.next_path, slots, BUILDING)
                    table.set(GROWING, 1)
                    self._open_next()
                    target = None
            self._copy_meta(target)
        except OSError as exc:  # a full disk: the current table stays (crowded, or incomplete: then `meta`)
            log.warning("presence table %s: no room for a larger one (%s)", self.path, exc)
            self._next_try = time.monotonic() + 60.0
            with self.locked():
                if self.table is not None and self.next is None:
                    self.table.set(GROWING, 0)
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
                if not table.fill([k for k, _ in rows], [q for _, q in rows]):
                    raise RuntimeError("presence table full while being filled")
                if len(rows) == FILL_CHUNK:
                    after = rows[-1][0]
                    continue
                table.set(STATE, COMPLETE)
                if target is None:
                    self._swap()
                log.info("presence table %s: complete (%d keys)", self.path, table.get(USED))
                return

    def _swap(self) -> None:
        """Under the lock: the filled next table becomes the table."""
        assert self.next is not None and self.table is not None
        os.replace(self.next_path, self.path)
        old, self.table, self.next = self.table, self.next, None
        old.set(RETIRED, 1)
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
