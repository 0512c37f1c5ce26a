"""The engine's reads of inline blobs and of file blobs' checksums (a mixin of `Engine`).

Hot: BatchReadBlobs runs `get_inline` in the event loop for every batch, so it calls
LMDB directly and copies only the data out of the map.  Every read is verified against
the checksum stored at write (check.py), or, for entries older code wrote, the digest
function.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

from casbah.digest import Digest
from casbah.storage.engine.check import intact, matches
from casbah.storage.engine.index import INLINE, Record, Txn, inline_of, key_of, seq_key, split_checked

if TYPE_CHECKING:
    from casbah.storage.engine.core import Engine

_seq_key = struct.Struct(">Q").pack  # seq_key, without the call
_seq_in = struct.Struct("<Q").unpack_from  # a record's position, without unpacking it whole


class Reads:
    def get_inline(self: Engine, digests: Sequence[Digest]) -> tuple[dict[Digest, bytes], list[Digest], list[Digest]]:
        """Inline blobs verified (when this store verifies): (found, corrupt, stored as files).
        A record whose `order` entry is gone is missing (not corrupt: no bytes were read)
        and goes to `dangling`, for the next flush to drop."""
        found: dict[Digest, bytes] = {}
        corrupt: list[Digest] = []
        files: list[Digest] = []
        gaps = self._get_inline(digests, found, corrupt, files)
        if gaps:  # moved since our `meta` snapshot (its old entry retired): look again, once
            for digest in self._get_inline(gaps, found, corrupt, files):
                self.dangling.add(key_of(digest))
        return found, corrupt, files

    def _get_inline(self: Engine, digests: Sequence[Digest], found: dict[Digest, bytes], corrupt: list[Digest],
                    files: list[Digest]) -> list[Digest]:
        """One snapshot's pass of `get_inline`; returns the records whose entry it did not
        find.  Hot (BatchReadBlobs, in the event loop): LMDB's own calls, `order` values
        read as views into the map and only the data copied out (4.2 -> 3.0 µs a blob of
        1-8 KiB, bench/RESULTS.md)."""
        env = self.env
        meta, order = env.meta, env.order
        verify = self.verify
        gaps: list[Digest] = []
        old: list[bytes] = []
        with env.begin(buffers=True) as txn:
            boundary = self._boundary(txn)
            get_record = txn.meta_txn.get
            get_entry = txn.data_txn.get
            for digest in digests:
                key = key_of(digest)
                value = get_record(key, None, meta)
                if value is None:
                    continue
                seq = _seq_in(value, 8)[0]
                if seq <= boundary:  # only blobs about to be evicted need a refresh
                    old.append(key)
                if value[-1] != INLINE:
                    files.append(digest)
                    continue
                entry = get_entry(_seq_key(seq), None, order)
                parsed = inline_of(entry, key) if entry is not None else None
                if parsed is None:
                    gaps.append(digest)
                    continue
                check, data = parsed
                # The checksum stored at write when there is one (every store, the ActionCache
                # too); an entry older code wrote: the digest function, where it names the bytes.
                if not (intact(data, check) if check is not None else not verify or matches(digest, data)):
                    corrupt.append(digest)
                    continue
                found[digest] = data
        if old:
            self.touched.update(old)
        return gaps

    def _inline_entry(self: Engine, txn: Txn, key: bytes, record: Record) -> tuple[bytes | None, bytes] | None:
        """(stored checksum or None, bytes) of the entry the record points at, or None
        when its `order` entry is gone."""
        value = txn.get(seq_key(record.seq), db=self.env.order)
        if value is None:
            return None
        stored_key, check, data = split_checked(value)
        return (check, data) if stored_key == key else None

    def file_check(self: Engine, digest: Digest) -> tuple[Record, bytes | None] | None:
        """A file blob's record and stored checksum (None: an entry older code wrote), or
        None when it is gone.  Every entry of one blob has the same checksum (it is a
        function of the content), so a re-upload racing this read changes nothing."""
        key = key_of(digest)
        with self.env.begin() as txn:
            value = txn.get(key, db=self.env.meta)
            if value is None:
                return None
            record = Record.unpack(value)
            entry = txn.get(seq_key(record.seq), db=self.env.order)
        if entry is None:
            return None
        stored_key, check, _data = split_checked(entry[:128])
        return (record, check) if stored_key == key else None
