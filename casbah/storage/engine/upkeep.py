"""The engine's maintenance: eviction on demand, bulk loads, listing, stats, scrubbing.

A mixin of `Engine` (core.py), kept apart so each file stays readable; these are the
calls tools and benchmarks use (docs/storage-engine.md, "API").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from casbah.digest import Digest
from casbah.errors import ResourceExhausted
from casbah.storage.engine.check import intact, matches, new_hasher
from casbah.storage.engine.index import INLINE, Record, Txn, digest_of, key_of, seq_key, seq_of, split_order_value
from casbah.storage.engine.quota import evict, remove_entry
from casbah.storage.keys import parse_key

if TYPE_CHECKING:
    from casbah.storage.engine.core import Engine

log = logging.getLogger(__name__)

#: Files no record names are removed by `sweep_files` once older than this (seconds).
ORPHAN_AGE = 60.0
#: Bytes per readahead request when warming the index (`Upkeep.warm_index`).
WARM_CHUNK = 8 << 20


class Upkeep:
    def _boundary(self: Engine, txn: Txn) -> int:
        """The last position of the oldest quarter of `order`, or 0 (refresh nothing).

        Blobs used from the oldest quarter are copied to its end (refreshed); the others
        need no write at all.  Nothing is refreshed while the store holds less than half
        its quota: no eviction is near, and a blob still in use is refreshed when used
        once it is (measured: a BatchReadBlobs benchmark over a small store spent 19 % of
        the server's CPU moving the oldest quarter on every pass).  A store without a
        quota keeps its use order, for the quota an operator may give it later.
        """
        if self.max_bytes and 2 * self.env.counter(txn, b"charged") < self.max_bytes:
            return 0
        cursor = txn.cursor(db=self.env.order)
        head = int.from_bytes(cursor.key(), "big") if cursor.first() else 0
        cursor.close()
        return head + (self.env.counter(txn, b"seq") - head) // 4

    def warm_index(self: Engine, wait: bool = False) -> None:
        """Ask the kernel to read the presence table and the `meta` environment into the
        page cache (readahead in the kernel: no CPU here), so FindMissingBlobs does not
        fault page by page after a restart.  In a thread unless `wait`: submitting the
        reads of a large file blocks for a while.  One call per `WARM_CHUNK`: Linux reads
        ahead at most its readahead window per call (one call on the whole file read 8 MiB
        of it)."""
        paths = [self.root / "meta" / "presence", self.root / "meta" / "data.mdb"]

        def advise() -> None:
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    for offset in range(0, os.fstat(fd).st_size, WARM_CHUNK):
                        os.posix_fadvise(fd, offset, WARM_CHUNK, os.POSIX_FADV_WILLNEED)
                except OSError as exc:  # a filesystem without it: only slower lookups
                    log.debug("disk storage %s: no readahead of %s: %s", self.name, path, exc)
                finally:
                    os.close(fd)

        if wait:
            advise()
        else:
            threading.Thread(target=advise, name="casbah-warm-index", daemon=True).start()

    def flush_touches(self: Engine) -> int:
        """Refresh the blobs used since the last flush (one transaction; every write
        transaction does the same on its way)."""
        if not self.touched and not self.dangling:
            return 0
        try:
            return self._write(self._apply_touches, "recording use")
        except ResourceExhausted:
            return 0  # use is a hint: losing one flush on a full disk only ages those blobs

    def _apply_touches(self: Engine, txn: Txn, unlinks: list[str]) -> int:
        """Copy used blobs that are in the oldest quarter of `order` to its end; drop
        the records reads found dangling."""
        if self.dangling:
            self._drop_dangling(txn, unlinks)
        touched = self.touched
        self.touched = set[bytes]()
        if not touched:
            return 0
        env = self.env
        boundary = self._boundary(txn)
        moved = 0
        seq = env.counter(txn, b"seq")  # handed out here, stored once at the end
        for key in list(touched):  # a copy: the event loop may still add to the old set
            value = txn.get(key, db=env.meta)
            if value is None:
                continue
            record = Record.unpack(value)
            if record.seq > boundary:
                continue
            old = seq_key(record.seq)
            entry = txn.get(old, db=env.order)
            if entry is None:
                continue
            txn.retire(old)  # after the record's new position is visible
            seq += 1
            txn.put(seq_key(seq), entry, db=env.order, append=True)  # the checksum moves with it
            record.seq = seq
            txn.put(key, record.pack(), db=env.meta)
            moved += 1
        if moved:
            env.set_counter(txn, b"seq", seq)
        return moved

    def _drop_dangling(self: Engine, txn: Txn, unlinks: list[str]) -> int:
        """Remove records whose `order` entry is gone, re-checked in this write
        transaction (a re-upload may have replaced one since it was read)."""
        keys, self.dangling = self.dangling, set[bytes]()
        env = self.env
        charged = env.counter(txn, b"charged")
        objects = env.counter(txn, b"objects")
        removed = 0
        for key in keys:
            value = txn.get(key, db=env.meta)
            if value is None:
                continue
            record = Record.unpack(value)
            entry = txn.get(seq_key(record.seq), db=env.order)
            if entry is not None and split_order_value(entry[:256])[0] == key:
                continue
            log.warning("disk storage %s: %s had lost its data (an interrupted write or delete): "
                        "removed", self.name, digest_of(key))
            remove_entry(env, txn, key, record, self.file_path_of_key, unlinks)
            charged -= record.charge
            objects -= 1
            removed += 1
        env.set_counter(txn, b"charged", charged)
        env.set_counter(txn, b"objects", objects)
        return removed

    def evict_to(self: Engine, target: int) -> int:
        """Evict least recently used blobs until at most `target` bytes are charged."""

        def body(txn: Txn, unlinks: list[str]) -> int:
            env = self.env
            charged, removed = evict(env, txn, env.counter(txn, b"charged"), target,
                                     lambda k: k in self._pins, self.file_path_of_key, unlinks)
            env.set_counter(txn, b"charged", charged)
            env.set_counter(txn, b"objects", env.counter(txn, b"objects") - removed)
            return removed

        removed = self._write(body, "evicting")
        self.evictions += removed
        return removed

    def gc(self: Engine) -> int:
        """Evict down to the quota (after it was lowered), and remove files no record
        names (`sweep_files`); returns blobs evicted."""
        removed = self.evict_to(self.max_bytes) if self.max_bytes else 0
        self.sweep_files()
        return removed

    def sweep_files(self: Engine, min_age: float = ORPHAN_AGE) -> int:
        """Remove files under `files/` that no record names and that are older than
        `min_age` seconds: left by a crash between a file's rename and the commit that
        indexes it.  O(files), so only in `gc` and `scrub`.  Each prefix directory's
        candidates are re-checked and unlinked inside a write transaction, which no
        writer can be half-way through (renames happen inside theirs)."""
        removed = 0
        now = time.time()
        try:
            prefixes = sorted(e.path for e in os.scandir(self.area.files) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return 0
        for prefix in prefixes:
            candidates: list[tuple[str, bytes]] = []
            with self.env.meta_env.begin(db=self.env.meta) as txn:
                for entry in os.scandir(prefix):
                    digest = parse_key(entry.name)
                    if digest is None or not entry.is_file(follow_symlinks=False):
                        continue
                    key = key_of(digest)
                    if txn.get(key) is None and now - entry.stat(follow_symlinks=False).st_mtime > min_age:
                        candidates.append((entry.path, key))
            if candidates:
                removed += self._write(lambda txn, unlinks, c=candidates: self._orphan_files(txn, unlinks, c),
                                       "removing orphaned files")
        if removed:
            log.warning("disk storage %s: removed %d files no index entry named (an interrupted write)",
                        self.name, removed)
        return removed

    def _orphan_files(self: Engine, txn: Txn, unlinks: list[str], candidates: list[tuple[str, bytes]]) -> int:
        count = 0
        for path, key in candidates:
            if txn.get(key, db=self.env.meta) is None:
                unlinks.append(path)  # unlinked before the commit, under the write lock
                count += 1
        return count

    # -- bulk, iteration, stats -----------------------------------------------------

    def bulk_load(self: Engine, blobs: Iterable[tuple[Digest, bytes]], batch: int = 10_000) -> int:
        """Store many blobs fast (benchmarks, migration): one transaction per `batch`."""
        count = 0
        chunk: list[tuple[Digest, bytes]] = []
        for item in blobs:
            chunk.append(item)
            if len(chunk) >= batch:
                count += sum(e is None for e in self.put_many(chunk))
                chunk = []
        if chunk:
            count += sum(e is None for e in self.put_many(chunk))
        return count

    def iterate(self: Engine, page: int = 1000) -> Iterator[tuple[Digest, Record]]:
        """Every entry, one short read transaction per `page` entries (bounded memory)."""
        after = b""
        while True:
            rows: list[tuple[bytes, bytes]] = []
            with self.env.meta_env.begin(db=self.env.meta) as txn:
                cursor = txn.cursor()
                ok = cursor.set_range(after) if after else cursor.first()
                if ok and after and cursor.key() == after:
                    ok = cursor.next()
                while ok and len(rows) < page:
                    rows.append((cursor.key(), cursor.value()))
                    ok = cursor.next()
            for key, value in rows:
                yield digest_of(key), Record.unpack(value)
            if len(rows) < page:
                return
            after = rows[-1][0]

    def stats(self: Engine) -> dict[str, int]:
        env = self.env
        with env.begin() as txn:
            stats = {
                "bytes": env.counter(txn, b"charged"),
                "objects": env.counter(txn, b"objects"),
                "db_bytes": env.page_bytes(txn),
            }
        stats["db_file_bytes"] = env.file_bytes()
        stats["map_size"] = env.map_size()
        stats["quota_bytes"] = self.max_bytes
        stats["evictions"] = self.evictions
        stats["pending_touches"] = len(self.touched)
        return stats

    def scrub(self: Engine, rate: int = 0, remove: bool = True,
              on_blob: Callable[[Digest, int, bool], None] | None = None) -> tuple[int, int, list[Digest]]:
        """Re-hash every blob at most `rate` bytes a second (0 = unlimited); drop the
        corrupt ones (unless not `remove`).  Returns (blobs checked, bytes, corrupt).

        Safe beside a running server (in this process or another): entries are read
        in short read transactions, and a drop is an ordinary write transaction, so
        FindMissingBlobs reports a dropped blob missing at once.  Records that lost
        their `order` entry, and `order` entries no record points at (both left by a
        crash between the two commits of a write), are removed too."""
        self.sweep_orphans()
        self.sweep_files()
        checked = done = 0
        corrupt: list[Digest] = []
        started = time.monotonic()
        for digest, record in self.iterate():
            ok, size = self._check(digest, record)
            if size < 0:
                continue  # evicted or deleted meanwhile
            checked += 1
            done += size
            if not ok:
                corrupt.append(digest)
                log.warning("scrub: %s in disk storage %s is corrupt%s", digest, self.name,
                            ": removed" if remove else "")
                if remove:
                    self.drop([digest])
            if on_blob is not None:
                on_blob(digest, size, ok)
            if rate:
                ahead = done / rate - (time.monotonic() - started)
                if ahead > 0:
                    time.sleep(ahead)
        self.flush_touches()  # drops the dangling records found
        return checked, done, corrupt

    def sweep_orphans(self: Engine, page: int = 10_000) -> int:
        """Delete `order` entries whose key's record does not point at them (a crash
        after `order` committed and before `meta` did), `page` entries per short read
        transaction; each batch is re-checked in its write transaction."""
        env = self.env
        after = b""
        removed = 0
        while True:
            candidates: list[bytes] = []
            seen = 0
            with env.begin() as txn:
                cursor = txn.cursor(db=env.order)
                ok = cursor.set_range(after) if after else cursor.first()
                if ok and after and cursor.key() == after:
                    ok = cursor.next()
                while ok and seen < page:
                    skey = bytes(cursor.key())
                    after = skey
                    seen += 1
                    if not self._points_at(txn, skey, bytes(cursor.value()[:256])):
                        candidates.append(skey)
                    ok = cursor.next()
            if candidates:
                removed += self._write(lambda txn, _u, c=candidates: self._delete_orphans(txn, c),
                                       "removing orphaned entries")
            if seen < page:
                return removed

    def _points_at(self: Engine, txn: Txn, skey: bytes, head: bytes) -> bool:
        key, _data = split_order_value(head)
        value = txn.get(key, db=self.env.meta)
        return value is not None and Record.unpack(value).seq == seq_of(skey)

    def _delete_orphans(self: Engine, txn: Txn, skeys: list[bytes]) -> int:
        removed = 0
        for skey in skeys:
            entry = txn.get(skey, db=self.env.order)
            if entry is not None and not self._points_at(txn, skey, entry[:256]):
                txn.delete(skey, db=self.env.order)
                removed += 1
        if removed:
            log.warning("disk storage %s: removed %d orphaned entries (an interrupted write)", self.name, removed)
        return removed

    def _check(self: Engine, digest: Digest, record: Record) -> tuple[bool, int]:
        """(matches, bytes read); bytes -1 when the entry is gone or cannot be checked.
        A verifying store re-hashes with the digest function (which also catches a forged
        checksum); a `verify: false` store (the ActionCache) checks the stored checksum,
        where the entry has one."""
        key = key_of(digest)
        with self.env.begin() as txn:
            if txn.get(key, db=self.env.meta) is None:
                return True, -1  # evicted or deleted meanwhile
            entry = self._inline_entry(txn, key, record)
        if entry is None:  # a record without its `order` entry: dropped by the next flush
            self.dangling.add(key)
            return True, -1
        check, data = entry
        if not self.verify and check is None:
            return True, -1  # nothing to check it against
        if record.where == INLINE:
            return (matches(digest, data) if self.verify else intact(data, check or b"")), len(data)
        try:
            f = open(self.area.path(digest), "rb", buffering=0)
        except FileNotFoundError:
            return (False, 0) if self.missing([digest]) == [] else (True, -1)
        hasher = digest.function.hasher(digest.size) if self.verify else new_hasher()
        size = 0
        with f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        if self.verify:
            return size == digest.size and hasher.hexdigest() == digest.hash, size
        return size == record.length and hasher.digest() == check, size
