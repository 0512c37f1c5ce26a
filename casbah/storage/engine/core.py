"""The engine: a synchronous, thread-safe store over the LMDB index and the file area.

`casbah/storage/disk.py` adapts it to the async `Storage` interface; benchmarks and
admin commands may use it directly (`bulk_load`, `stats`, `scrub`, `gc`, `evict_to`).
Every method that writes runs one LMDB write transaction (one writer at a time per
environment, across processes, so call those in a thread); reads (`missing`,
`lookup`, `get_inline`) never write and are cheap enough for the event loop.

Last use is recorded in memory (`touched`, a set of keys) and flushed in one write
transaction by `flush_touches` (the async layer calls it every few seconds or every
`TOUCH_BATCH` keys), so a read never waits for a write.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import compress
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np

from casbah.digest import Digest, DigestFunction
from casbah.digest_batch import DigestArray
from casbah.errors import DataLoss, ResourceExhausted, from_os_error
from casbah.storage.engine.check import checksum
from casbah.storage.engine.files import FileArea, TmpFile
from casbah.storage.engine.hashtable import digest_fingerprints
from casbah.storage.engine.index import (
    FILE,
    INLINE,
    LAYOUT,
    Env,
    Record,
    Txn,
    digest_of,
    key_of,
    map_error,
    order_value,
    seq_key,
)
from casbah.storage.engine.quota import charge_file, charge_inline, evict, remove_entry
from casbah.storage.engine.reads import Reads
from casbah.storage.engine.upkeep import Upkeep
from casbah.streams import NoVerifier, Verifier

_T = TypeVar("_T")
log = logging.getLogger(__name__)

#: A blob for `_add`: (position in the request, key, inline data or None, file blocks,
#: the sealed temporary file to publish or None).
Entry = tuple[int, bytes, "bytes | None", int, "TmpFile | None"]

#: Batches at least this large use the presence table (numpy's per-call cost beats
#: LMDB's per-key cost from about here; smaller ones look up in `meta`).
PRESENCE_MIN = 16
#: Blobs up to this size live inline in LMDB; larger ones are files (measured: docs/storage-engine.md).
INLINE_MAX = 16 * 1024
#: Default map size: address space only (the file grows as pages are written).
MAP_SIZE = 256 << 30
TOUCH_BATCH = 4096
#: Fast mode: seconds of commits a power failure may lose (an explicit sync after a commit that follows a quiet spell).
SYNC_INTERVAL = 1.0
#: The share of the map inline data may fill (the rest: room for deletes and readers' old pages).
MAP_HEADROOM = 0.85


class Engine(Reads, Upkeep):
    def __init__(self, root: str | os.PathLike, *, max_bytes: int = 0, durable: bool = False,
                 inline_max: int = INLINE_MAX, map_size: int = 0, verify: bool = True,
                 clear_tmp: bool = False, name: str = "") -> None:
        self.root = Path(root)
        self.name = name or str(self.root)
        self.max_bytes = max_bytes
        self.inline_max = inline_max
        self.verify = verify
        self.durable = durable
        self.area = FileArea(self.root, durable)
        self.env = Env.acquire(self.root, map_size or MAP_SIZE, durable)
        self._lock = threading.Lock()
        self._pins: Counter[bytes] = Counter()
        self.touched: set[bytes] = set()
        #: Inline records found without their `order` entry (a crash between the two
        #: commits, or an eviction racing the read): dropped by the next flush.
        self.dangling: set[bytes] = set()
        self.evictions = 0
        self._closed = False
        self._synced = time.monotonic()
        if clear_tmp:
            self.area.clear_tmp()
        self._check_layout()
        self.presence = self.env.open_presence()

    def _check_layout(self) -> None:
        with self.env.begin() as txn:
            layout = self.env.counter(txn, b"layout")
        if layout != LAYOUT:
            from casbah.storage.engine.migrate import upgrade

            upgrade(self)

    def close(self) -> None:
        """Flush last uses and let go of the environment (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.flush_touches()
        if not self.durable:
            self.env.sync()
        self.env.release()

    # -- keys and pins ---------------------------------------------------------------

    def file_path_of_key(self, key: bytes) -> str:
        return self.area.path(digest_of(key))

    def pin(self, key: bytes) -> None:
        with self._lock:
            self._pins[key] += 1

    def unpin(self, key: bytes) -> None:
        with self._lock:
            self._pins[key] -= 1
            if self._pins[key] <= 0:
                del self._pins[key]

    # -- reads ---------------------------------------------------------------------

    def missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        """The absent ones, in order; the present ones are touched.  Batches are answered
        by the presence table when it is complete (presence.py), else by `meta`."""
        table = self.presence.check() if len(digests) >= PRESENCE_MIN else None
        fps = digest_fingerprints(digests) if table is not None else None
        if table is None or fps is None:
            return self._missing_in_meta(digests)
        found, seqs, left = table.lookup(*fps)
        with self.env.begin() as txn:
            boundary = self._boundary(txn)
        if len(left):  # a long probe run: ask `meta`
            rest = [digests[i] for i in left.tolist()]
            absent = set(self._missing_in_meta(rest))
            for i, digest in zip(left.tolist(), rest, strict=True):
                found[i] = digest not in absent
                seqs[i] = boundary + 1  # touched (if needed) by that lookup
        old = np.flatnonzero(found & (seqs <= boundary))
        if len(old):  # only blobs about to be evicted need a refresh
            self.touched.update(key_of(digests[i]) for i in old.tolist())
        if isinstance(digests, DigestArray):
            return digests.select(~found)  # no `Digest` built for an absent one (digest_batch.py)
        return list(compress(digests, (~found).tolist()))

    def _missing_in_meta(self, digests: Sequence[Digest]) -> list[Digest]:
        out = []
        present = []
        meta = self.env.meta
        with self.env.begin() as txn:
            boundary = self._boundary(txn)
            get = txn.meta_txn.get
            for digest in digests:
                key = key_of(digest)
                value = get(key, None, meta)
                if value is None:
                    out.append(digest)
                elif _seq_in(value, 8)[0] <= boundary:  # only blobs about to be evicted need a refresh
                    present.append(key)
        if present:
            self.touched.update(present)
        return out

    def find_by_hash(self, hash_hex: str, function: DigestFunction) -> Digest | None:
        prefix = key_of(Digest(hash_hex, 0, function))[:-8]
        with self.env.meta_env.begin(db=self.env.meta) as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix) or not cursor.key().startswith(prefix):
                return None
            return digest_of(cursor.key())

    def lookup(self, digest: Digest) -> Record | None:
        key = key_of(digest)
        with self.env.begin() as txn:
            value = txn.get(key, db=self.env.meta)
            if value is None:
                return None
            if _seq_in(value, 8)[0] <= self._boundary(txn):
                self.touched.add(key)
        return Record.unpack(value)

    def open_file(self, digest: Digest) -> int | None:
        try:
            return os.open(self.area.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None

    # -- writes --------------------------------------------------------------------

    def _write(self, body: Callable[[Txn, list[str]], _T], what: str) -> _T:
        """Run `body` in one write transaction.  The files it released are unlinked, and
        new files renamed in, while the transaction holds LMDB's write lock (one writer
        across processes), so an eviction's unlink and a re-upload's rename of the same
        blob can never interleave with the index updates.  A crash between an unlink and
        the commit leaves an entry without its file: read as missing, and dropped."""
        unlinks: list[str] = []
        try:
            with self.env.begin(write=True) as txn:
                result = body(txn, unlinks)
                self.area.unlink_all(unlinks)
            if not self.durable and time.monotonic() - self._synced > SYNC_INTERVAL:
                self._synced = time.monotonic()
                self.env.sync()
        except lmdb.Error as exc:
            raise map_error(exc, f"disk storage {self.name} ({what})", self.root)  # noqa: B904 - keeps the cause
        return result

    def put_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        """Verify and store small blobs (large ones in the list become files), all in
        one write transaction.  A present blob is overwritten: a re-upload repairs it."""
        results: list[Exception | None] = [None] * len(blobs)
        entries: list[Entry] = []
        for pos, (digest, data) in enumerate(blobs):
            try:
                verifier = self._verifier(digest)
                if len(data) <= self.inline_max:
                    verifier.update(data)
                    verifier.finish()
                    entries.append((pos, key_of(digest), data, 0, None))
                else:
                    tmp = self.area.new_tmp(digest, verifier)
                    try:
                        tmp.seal([data])
                    except BaseException:
                        tmp.discard()
                        raise
                    entries.append((pos, key_of(digest), None, tmp.blocks, tmp))
            except OSError as exc:
                results[pos] = from_os_error(exc, f"disk storage {self.name}")
            except Exception as exc:
                results[pos] = exc
        if not entries:
            return results
        try:
            errors = self._write(lambda txn, unlinks: self._add(txn, unlinks, entries, [len(b[1]) for b in blobs]),
                                 "writing a batch")
        except Exception as exc:
            for pos, *_ in entries:
                results[pos] = exc
            return results
        finally:
            for entry in entries:
                if entry[4] is not None:
                    entry[4].discard()  # those not published (no-op for the others)
        for pos, error in errors.items():
            results[pos] = error
        return results

    def _add(self, txn: Txn, unlinks: list[str], entries: list[Entry],
             lengths: list[int]) -> dict[int, Exception]:
        env = self.env
        self._apply_touches(txn, unlinks)  # before evicting: what was used since is not the oldest
        charged = env.counter(txn, b"charged")
        objects = env.counter(txn, b"objects")
        batch = {entry[1] for entry in entries}
        errors: dict[int, Exception] = {}
        # LMDB needs free pages even to delete (copy-on-write): stop inline writes short of
        # the map's end, so eviction and deletes can always run and free space again.
        room = int(env.map_size() * MAP_HEADROOM) - env.page_bytes(txn, (env.order, env.seqs))
        for pos, key, data, blocks, tmp in entries:
            if data is not None:
                room -= len(data) + len(key) * 3
                if room < 0:
                    errors[pos] = ResourceExhausted(f"disk storage {self.name}: the index is full "
                                                    "(its map size is reached)")
                    continue
            old = txn.get(key, db=env.meta)
            if old is not None:
                record = Record.unpack(old)
                keep_file = record.where == FILE and data is None
                remove_entry(env, txn, key, record, self.file_path_of_key, [] if keep_file else unlinks,
                             replaced=True)
                charged -= record.charge
                objects -= 1
            if data is not None:
                charge, where, length = charge_inline(len(key), len(data)), INLINE, len(data)
            else:
                charge, where, length = charge_file(len(key), blocks), FILE, lengths[pos]
            if self.max_bytes and charge > self.max_bytes:
                errors[pos] = ResourceExhausted(
                    f"disk storage {self.name}: a blob of {length} bytes is larger than the quota of "
                    f"{self.max_bytes} bytes")
                continue
            if self.max_bytes and charged + charge > self.max_bytes:
                target = max(self.max_bytes - charge, 0)
                charged, removed = evict(env, txn, charged, target, lambda k: k in batch or k in self._pins,
                                         self.file_path_of_key, unlinks)
                objects -= removed
                self.evictions += removed
                if charged + charge > self.max_bytes:
                    errors[pos] = ResourceExhausted(
                        f"disk storage {self.name}: a blob of {length} bytes does not fit in the quota of "
                        f"{self.max_bytes} bytes beside the blobs being read or written")
                    continue
            if tmp is not None:
                self.area.publish(tmp, self.file_path_of_key(key))
            check = checksum(data) if data is not None else tmp.check.digest() if tmp is not None else None
            seq = self._append(txn, key, data, check)
            txn.put(key, Record(length, seq, charge, where).pack(), db=env.meta)
            charged += charge
            objects += 1
        env.set_counter(txn, b"charged", charged)
        env.set_counter(txn, b"objects", objects)
        return errors

    def put_file(self, digest: Digest, tmp: TmpFile, tail: list[bytes]) -> None:
        """Finish a streamed write: verify, rename into place, index (in a thread)."""
        key = key_of(digest)
        self.pin(key)
        try:
            try:
                tmp.seal(tail)
            except OSError as exc:
                raise from_os_error(exc, f"disk storage {self.name}")  # noqa: B904 - keeps the OSError cause
            errors = self._write(lambda txn, unlinks: self._add(txn, unlinks, [(0, key, None, tmp.blocks, tmp)],
                                                               [tmp.verifier.received]), "indexing a file")
        finally:
            tmp.discard()  # unless published
            self.unpin(key)
        if errors:
            raise next(iter(errors.values()))

    def drop(self, digests: Iterable[Digest], committed_only: bool = False) -> int:
        """Remove entries (and their data); returns how many were present."""
        keys = [key_of(d) for d in digests]

        def body(txn: Txn, unlinks: list[str]) -> int:
            env = self.env
            charged = env.counter(txn, b"charged")
            objects = env.counter(txn, b"objects")
            count = 0
            for key in keys:
                value = txn.get(key, db=env.meta)
                if value is None:
                    continue
                record = Record.unpack(value)
                remove_entry(env, txn, key, record, self.file_path_of_key, unlinks)
                charged -= record.charge
                objects -= 1
                count += 1
            env.set_counter(txn, b"charged", charged)
            env.set_counter(txn, b"objects", objects)
            return count

        return self._write(body, "removing blobs")

    def _append(self, txn: Txn, key: bytes, data: bytes | None, check: bytes | None) -> int:
        seq = self.env.counter(txn, b"seq") + 1
        self.env.set_counter(txn, b"seq", seq)
        txn.put(seq_key(seq), order_value(key, data, check), db=self.env.order, append=True)
        return seq

    def _verifier(self, digest: Digest) -> Verifier:
        return Verifier(digest) if self.verify else NoVerifier(digest)


_seq_in = struct.Struct("<Q").unpack_from  # a record's position, without unpacking it whole


def corrupt_error(digest: Digest, name: str) -> DataLoss:
    return DataLoss(f"blob {digest} as read from disk storage {name} does not match its digest: "
                    "removed, upload it again")


__all__ = ["INLINE_MAX", "Engine", "corrupt_error"]
