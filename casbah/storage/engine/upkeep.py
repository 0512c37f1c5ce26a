"""The engine's maintenance: eviction on demand, bulk loads, listing, stats, scrubbing.

A mixin of `Engine` (core.py), kept apart so each file stays readable; these are the
calls tools and benchmarks use (docs/storage-engine.md, "API").
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

import lmdb

from casbah.digest import Digest, DigestFunction
from casbah.errors import ResourceExhausted
from casbah.storage.engine.index import INLINE, Record, digest_of, key_of, seq_key
from casbah.storage.engine.quota import evict

if TYPE_CHECKING:
    from casbah.storage.engine.core import Engine

log = logging.getLogger(__name__)


class Upkeep:
    def _boundary(self: Engine, txn: lmdb.Transaction) -> int:
        """The last position of the oldest quarter of `order`: blobs used from there are
        copied to its end (refreshed); the others need no write at all."""
        cursor = txn.cursor(db=self.env.order)
        head = int.from_bytes(cursor.key(), "big") if cursor.first() else 0
        cursor.close()
        return head + (self.env.counter(txn, b"seq") - head) // 4

    def flush_touches(self: Engine) -> int:
        """Refresh the blobs used since the last flush (one transaction; every write
        transaction does the same on its way)."""
        if not self.touched:
            return 0
        try:
            return self._write(lambda txn, _unlinks: self._apply_touches(txn),
                               "recording use")
        except ResourceExhausted:
            return 0  # use is a hint: losing one flush on a full disk only ages those blobs

    def _apply_touches(self: Engine, txn: lmdb.Transaction) -> int:
        """Copy used blobs that are in the oldest quarter of `order` to its end."""
        touched = self.touched
        self.touched = set[bytes]()
        if not touched:
            return 0
        env = self.env
        boundary = self._boundary(txn)
        moved = 0
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
            txn.delete(old, db=env.order)
            record.seq = self._append_raw(txn, entry)
            txn.put(key, record.pack(), db=env.meta)
            moved += 1
        return moved

    def _append_raw(self: Engine, txn: lmdb.Transaction, entry: bytes | memoryview) -> int:
        seq = self.env.counter(txn, b"seq") + 1
        self.env.set_counter(txn, b"seq", seq)
        txn.put(seq_key(seq), entry, db=self.env.order, append=True)
        return seq

    def evict_to(self: Engine, target: int) -> int:
        """Evict least recently used blobs until at most `target` bytes are charged."""

        def body(txn: lmdb.Transaction, unlinks: list[str]) -> int:
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
        """Evict down to the quota (after it was lowered); returns blobs removed."""
        return self.evict_to(self.max_bytes) if self.max_bytes else 0

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
            with self.env.env.begin(db=self.env.meta) as txn:
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
        with env.env.begin() as txn:
            stats = {
                "bytes": env.counter(txn, b"charged"),
                "objects": env.counter(txn, b"objects"),
                "db_bytes": env.page_bytes(txn),
            }
        info = env.env.info()
        stats["db_file_bytes"] = (info["last_pgno"] + 1) * 4096
        stats["map_size"] = info["map_size"]
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
        FindMissingBlobs reports a dropped blob missing at once."""
        if not self.verify:
            return 0, 0, []
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
        return checked, done, corrupt

    def _check(self: Engine, digest: Digest, record: Record) -> tuple[bool, int]:
        """(matches, bytes read); bytes -1 when the entry is gone."""
        if record.where == INLINE:
            with self.env.env.begin() as txn:
                data = self._inline_data(txn, key_of(digest), record)
            if data is None:
                return True, -1
            return matches(digest, data), len(data)
        try:
            f = open(self.area.path(digest), "rb", buffering=0)
        except FileNotFoundError:
            return (False, 0) if self.missing([digest]) == [] else (True, -1)
        hasher = digest.function.hasher(digest.size)
        size = 0
        with f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
                size += len(chunk)
        return size == digest.size and hasher.hexdigest() == digest.hash, size



def matches(digest: Digest, data: bytes) -> bool:
    """Hot: every inline blob read is hashed (SHA-256 straight from hashlib, the common case)."""
    if len(data) != digest.size:
        return False
    if digest.function is DigestFunction.SHA256:
        return hashlib.sha256(data).hexdigest() == digest.hash
    hasher = digest.function.hasher(digest.size)
    hasher.update(data)
    return hasher.hexdigest() == digest.hash
