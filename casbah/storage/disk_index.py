"""The disk backend's index: what is stored, in which LRU order, and what may be evicted.

Pure bookkeeping, with no I/O, no clock and no asyncio, so the quota rules can be
tested on their own and a different storage engine can keep them.  `DiskStorage`
owns the files and calls this class from the event loop, which serialises every
call: no locks.

The state and its rules:

- `entries`: digest -> stored size, least recently used first.  An `OrderedDict`,
  because a use is one `move_to_end` and eviction pops from the front.
- `used` is the sum of the entries' sizes; `reserved` the bytes promised to writes
  in progress.  A write reserves its size before it reads any data, evicting to
  make room, so with a quota (`max_bytes`, 0 = none) concurrent writes cannot
  overshoot it together: `used + reserved <= max_bytes` after every reservation.
- Pins (blobs being read) and commits (blobs a writer is renaming into place) are
  counted per digest, and a pinned or committing blob is never evicted.  When only
  such blobs could make room, the reservation is refused and nothing changes.
- The time of each use since the last `take_touched()`, which the owner persists
  (the disk backend writes it to the files' mtimes, which a restart orders by).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from casbah.digest import Digest
from casbah.errors import ResourceExhausted


class DiskIndex:
    def __init__(self, max_bytes: int = 0) -> None:
        self.max_bytes = max_bytes  # 0 = no quota
        #: digest -> stored size, least recently used first.
        self.entries: OrderedDict[Digest, int] = OrderedDict()
        self.used = 0
        self.reserved = 0
        #: Blobs chosen by `make_room` since the index was created.
        self.evictions = 0
        self._pins: dict[Digest, int] = {}
        self._committing: dict[Digest, int] = {}
        self._touched: dict[Digest, float] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, digest: Digest) -> bool:
        return digest in self.entries

    def size(self, digest: Digest) -> int | None:
        """The stored size, without counting as a use; None when absent."""
        return self.entries.get(digest)

    def load(self, found: Iterable[tuple[Digest, int]]) -> None:
        """Index what a startup scan found, least recently used first."""
        entries = self.entries
        for digest, size in found:
            old = entries.pop(digest, None)
            if old is not None:
                self.used -= old
            entries[digest] = size
            self.used += size

    # -- uses ----------------------------------------------------------------------

    def touch(self, digest: Digest, now: float) -> int | None:
        """A use of `digest` at time `now`: it becomes the most recently used.

        Returns its stored size, or None (and changes nothing) when it is absent.
        """
        size = self.entries.get(digest)
        if size is not None:
            self.entries.move_to_end(digest)
            self._touched[digest] = now
        return size

    def find_missing(self, digests: Iterable[Digest], now: float) -> list[Digest]:
        """The absent digests, in order; the present ones are used at `now`.

        The FindMissingBlobs hot path: one loop with local names, no call per digest.
        """
        entries = self.entries
        touched = self._touched
        missing = []
        for digest in digests:
            if digest in entries:
                entries.move_to_end(digest)
                touched[digest] = now
            else:
                missing.append(digest)
        return missing

    def take_touched(self) -> dict[Digest, float]:
        """The uses recorded since the last call (digest -> time of last use)."""
        touched, self._touched = self._touched, {}
        return touched

    @property
    def has_touched(self) -> bool:
        return bool(self._touched)

    def snapshot(self, default_time: float) -> list[tuple[Digest, int, float]]:
        """(digest, size, last use) of every entry, least recently used first; a blob
        whose last use was already taken (or that was not used since startup) gets
        `default_time`."""
        touched = self._touched
        return [(digest, size, touched.get(digest, default_time)) for digest, size in self.entries.items()]

    # -- membership ----------------------------------------------------------------

    def add(self, digest: Digest, size: int) -> list[Digest]:
        """A blob this process stored: it replaces any entry for `digest`, as the most
        recently used.

        Returns the blobs evicted to get back under the quota, which happens only
        when the size was not reserved in full beforehand (a write whose size is
        known only at its end); their files must go.  When only blobs in use could
        make room the index stays over quota until a later write makes room.
        """
        entries = self.entries
        old = entries.pop(digest, None)
        if old is not None:
            self.used -= old
        entries[digest] = size
        self.used += size
        if self.max_bytes and self.used + self.reserved > self.max_bytes:
            try:
                return self.make_room(0)
            except ResourceExhausted:
                return []
        return []

    def adopt(self, digest: Digest, size: int) -> bool:
        """A blob another process stored in the same directory: indexed, as the most
        recently used, unless already present.  The writer reserved its room; no
        eviction here.  Returns whether it was added."""
        if digest in self.entries:
            return False
        self.entries[digest] = size
        self.used += size
        return True

    def remove(self, digest: Digest) -> int | None:
        """Forget a blob (deleted, gone from disk, evicted by another process).
        Returns its size, or None when it was absent."""
        size = self.entries.pop(digest, None)
        if size is not None:
            self.used -= size
            self._touched.pop(digest, None)
        return size

    def apply_changes(self, changes: Iterable[tuple[str, Digest, int]]) -> None:
        """Apply other processes' changes: ("+", digest, size) adopts a blob, ("-",
        digest, _) forgets one unless it is in use here (a reader holds its open
        file; a writer here is storing it again)."""
        for op, digest, size in changes:
            if op == "+":
                self.adopt(digest, size)
            elif digest in self.entries and not self.is_busy(digest):
                self.remove(digest)

    # -- pins and commits ----------------------------------------------------------

    def pin(self, digest: Digest) -> None:
        """A reader holds `digest`: never evict it until as many `unpin`s."""
        self._pins[digest] = self._pins.get(digest, 0) + 1

    def unpin(self, digest: Digest) -> None:
        count = self._pins.pop(digest, 1) - 1
        if count > 0:
            self._pins[digest] = count

    def use_and_pin(self, digests: Sequence[Digest], now: float) -> None:
        """`touch` and `pin` each of `digests` (all present): a batch read's start."""
        entries = self.entries
        touched = self._touched
        pins = self._pins
        for digest in digests:
            entries.move_to_end(digest)
            touched[digest] = now
            pins[digest] = pins.get(digest, 0) + 1

    def unpin_all(self, digests: Iterable[Digest]) -> None:
        for digest in digests:
            self.unpin(digest)

    def begin_commit(self, digests: Iterable[Digest]) -> None:
        """Writers are about to rename files for `digests` into place: never evict
        (or delete) them until `end_commit`, or an unlink could land after the rename."""
        committing = self._committing
        for digest in digests:
            committing[digest] = committing.get(digest, 0) + 1

    def end_commit(self, digests: Iterable[Digest]) -> None:
        committing = self._committing
        for digest in digests:
            count = committing.pop(digest, 1) - 1
            if count > 0:
                committing[digest] = count

    def is_pinned(self, digest: Digest) -> bool:
        return digest in self._pins

    def is_committing(self, digest: Digest) -> bool:
        return digest in self._committing

    def is_busy(self, digest: Digest) -> bool:
        """Pinned or committing: not evictable."""
        return digest in self._pins or digest in self._committing

    # -- quota ---------------------------------------------------------------------

    def reserve(self, size: int) -> list[Digest]:
        """Reserve `size` bytes for a write, evicting least recently used blobs first.

        Returns the evicted blobs, whose files the caller must remove.  Raises
        ResourceExhausted, having changed nothing, when `size` exceeds the quota or
        only blobs in use could make room.  Undo with `release(size)`.
        """
        if self.max_bytes and self.used + self.reserved + size > self.max_bytes:
            victims = self.make_room(size)
        else:
            victims = []
        self.reserved += size
        return victims

    def release(self, size: int) -> None:
        """The write that reserved `size` bytes is over (stored, failed or cancelled)."""
        self.reserved -= size

    def make_room(self, size: int) -> list[Digest]:
        """Take least recently used blobs out of the index until `size` more bytes fit,
        skipping blobs in use (they stay, as the most recently used).

        Evicts exactly enough: it stops at the first blob that brings the total under
        the quota.  Returns the victims.  Raises ResourceExhausted, having changed
        nothing, when `size` is larger than the quota or only blobs in use could
        make room.
        """
        if not self.max_bytes:
            return []
        if size > self.max_bytes:
            raise ResourceExhausted(f"blob of {size} bytes is larger than the disk quota ({self.max_bytes} bytes)")
        excess = self.used + self.reserved + size - self.max_bytes
        if excess <= 0:
            return []
        entries = self.entries
        busy = self._pins.keys() | self._committing.keys()
        busy_bytes = sum(entries.get(d, 0) for d in busy)
        if self.used - busy_bytes < excess:
            raise ResourceExhausted(
                f"disk quota of {self.max_bytes} bytes is full of blobs in use or being written; "
                f"cannot store {size} more bytes"
            )
        victims: list[Digest] = []
        skipped: list[tuple[Digest, int]] = []
        freed = 0
        while freed < excess:
            digest, stored = entries.popitem(last=False)
            if digest in busy:
                skipped.append((digest, stored))
                continue
            victims.append(digest)
            freed += stored
        for digest, stored in skipped:  # in use: keep them, as most recently used
            entries[digest] = stored
        self.used -= freed
        self.evictions += len(victims)
        return victims
