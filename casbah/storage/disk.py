"""`disk`: one file per blob under a data directory, with a byte quota and LRU eviction.

Layout: `objects/<2 hex>/<key>` (key = `hash-size` for sha256, `<function>-hash-size` for the others) and
`tmp/` for writes in progress.  A write goes to `tmp/`, is hashed as it is written,
and is renamed into `objects/` only once verified, so a reader (or a restart after
SIGKILL) never sees a partial blob; `tmp/` is emptied at startup, and an object
file whose size is not the one its name says (a machine crash without fsync) is
removed then too.

The parts: `disk_index.py` (what is stored, LRU order, reservations, pins, quota
and eviction order; pure), `disk_files.py` (the directory and its blocking file
operations, run in threads), `disk_upkeep.py` (unlinks in order, last uses to mtimes),
`disk_journal.py` (keeping `serve --workers N` processes in step), and this module,
which decides what each request does to the index and which thread hops it takes.

The index is built once at startup from one scan (ordered by mtime, which records
last use): FindMissingBlobs is then a dictionary lookup, and no request rescans
the tree.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DigestMismatch, ResourceExhausted
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, check_range, empty_stream
from casbah.storage.disk_files import FileReader, ObjectFiles, parse_key, run_to_end, single_chunk
from casbah.storage.disk_index import DiskIndex
from casbah.storage.disk_journal import Journal
from casbah.storage.disk_upkeep import LastUseWriter, UnlinkHops
from casbah.storage.loader import NodeOptions, StorageLoader, register

log = logging.getLogger(__name__)

_TOUCH_INTERVAL = 60.0


class DiskStorage(Storage):
    kind = "disk"

    def __init__(self, *, path: str | os.PathLike, max_bytes: int = 0, fsync: bool = False,
                 maintenance: bool = False, journal: bool = False, **kwargs) -> None:
        """`maintenance`: opened beside a live server (admin commands): leave its tmp/
        alone.  `journal`: other processes serve the same directory at the same time
        (`serve --workers N`): keep in step with them through `<path>/journal`."""
        super().__init__(**kwargs)
        self.maintenance = maintenance
        self.root = Path(path)
        self.max_bytes = max_bytes  # 0 = no quota
        self.fsync = fsync
        self._files = ObjectFiles(self.root, fsync)
        self._index = DiskIndex(max_bytes)
        self._unlinks = UnlinkHops()
        self._last_use = LastUseWriter(self._index, self._files)
        self._open()
        self._journal = Journal(self.root / "journal", parse_key) if journal else None
        if self._journal is not None:
            self._journal.start(self._index.apply_changes)  # replay siblings' changes from the start

    def _open(self) -> None:
        started = time.monotonic()
        found, orphans, dropped = self._files.scan(self.verify, clear_tmp=not self.maintenance)
        self._index.load(found)
        log.info(
            "disk storage %s: %d blobs, %d bytes (quota %s); removed %d partial uploads and %d bad files in %.2fs",
            self.root, len(self._index), self._index.used, self.max_bytes or "none", orphans, dropped,
            time.monotonic() - started,
        )

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        index = self._index
        missing = index.find_missing(digests, time.time())
        if missing and self._journal is not None:
            # A sibling worker may have stored some within the last journal interval:
            # check their files, in one thread hop for the whole request.
            sizes = await asyncio.to_thread(self._files.sizes_of, missing)
            still = []
            for digest, size in zip(missing, sizes, strict=True):
                if size is None:
                    still.append(digest)
                elif not self.verify or size == digest.size:
                    index.adopt(digest, size)
            missing = still
        self._schedule_touch()
        return missing

    async def has(self, digest: Digest) -> bool:
        return digest in self._index or self._discover(digest)

    def _discover(self, digest: Digest) -> bool:
        """With sibling workers, a blob may be on disk before its journal line is replayed."""
        if self._journal is None:
            return False
        size = self._files.size_of(digest)
        if size is None or (self.verify and size != digest.size):
            return False
        self._index.adopt(digest, size)
        return True

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        size = self._lookup(digest)
        count = check_range(digest, size, offset, limit)
        if count == 0:
            return empty_stream()
        index = self._index
        index.pin(digest)
        if count <= CHUNK_SIZE:
            try:
                data = await asyncio.to_thread(self._files.read_range, digest, offset, count)
            finally:
                index.unpin(digest)
            if data is None or (self.verify and len(data) != count):
                self._lost(digest, data is not None)
            return single_chunk(data)
        try:
            handle = await asyncio.to_thread(self._files.open, digest)
        except BaseException:
            index.unpin(digest)
            raise
        if handle is None:
            index.unpin(digest)
            self._lost(digest, False)
        on_short = functools.partial(self._lost, digest, True) if self.verify else None
        return FileReader(handle, offset, count, on_close=functools.partial(index.unpin, digest), on_short=on_short)

    async def find_by_hash(self, hash_hex: str, function: DigestFunction) -> Digest | None:
        """The stored blob with this hash, whatever its size, or None.

        For protocols that name blobs by hash alone (the HTTP cache protocol): one
        listing of the blob's prefix directory, so a fallback, not a per-request path.
        The file, not the index, answers (a sibling worker's blob is on disk before it
        is in this process's index); callers check presence with `find_missing`.
        """
        stem = Digest(hash_hex, 0, function).key[:-1]  # the key without its size: `hash-`
        try:
            names = await asyncio.to_thread(os.listdir, f"{self._files.objects}/{hash_hex[:2]}")
        except OSError:
            return None
        for name in names:
            if name.startswith(stem) and (digest := parse_key(name)) is not None:
                return digest
        return None

    def _lookup(self, digest: Digest) -> int:
        size = self._index.touch(digest, time.time())
        if size is None:
            if not self._discover(digest):
                raise BlobNotFound(digest)
            size = self._index.touch(digest, time.time())
        self._schedule_touch()
        return size

    def _lost(self, digest: Digest, truncated: bool) -> None:
        """A file the index names is gone or short: stop naming it, and say NOT_FOUND.

        Only happens when something outside casbah removed or damaged the file
        (or an explicit delete raced the read); the blob must then stop being
        reported present, or FindMissingBlobs would keep lying about it.
        """
        index = self._index
        if truncated:
            if digest in index and not index.is_committing(digest):
                index.remove(digest)
                self._unlinks.start([digest], self._files.unlink_all, [digest])
            raise BlobNotFound(digest, "its file on disk is truncated; removed")
        if digest in index and not self._files.exists(digest):
            index.remove(digest)
        raise BlobNotFound(digest, "removed from disk behind casbah's back")

    async def read_bytes(self, digest: Digest) -> bytes:
        size = self._lookup(digest)
        self._index.pin(digest)
        try:
            if self.verify:
                data = await asyncio.to_thread(self._files.read_range, digest, 0, size)
            else:  # an entry may be overwritten (with another size) at any time: read it whole
                data = (await asyncio.to_thread(self._files.read_batch, [digest])).get(digest)
        finally:
            self._index.unpin(digest)
        if data is None or (self.verify and len(data) != size):
            self._lost(digest, data is not None)
        return data

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        index = self._index
        present = [d for d in digests if d in index or self._discover(d)]
        if not present:
            return {}
        index.use_and_pin(present, time.time())
        self._schedule_touch()
        try:
            found = await asyncio.to_thread(self._files.read_batch, present)
        finally:
            index.unpin_all(present)
        for digest in present:
            if digest not in found:
                try:
                    self._lost(digest, False)
                except BlobNotFound:
                    pass
            elif self.verify and len(found[digest]) != digest.size:
                del found[digest]
                try:
                    self._lost(digest, True)
                except BlobNotFound:
                    pass
        return found

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        index = self._index
        if self.verify and index.touch(digest, time.time()) is not None:
            self._schedule_touch()
            return  # content-addressed: the stored bytes are these bytes
        # With verification the size is known up front: reserve it before reading any
        # data.  Without (ActionCache entries), the size is known only at the end.
        reserved = digest.size if self.verify else 0
        victims = self._reserve(reserved)
        tmp = self._files.new_tmp(digest, self.verifier(digest))
        committing = False
        stored = -1
        cancelled = False
        try:
            if victims:
                await asyncio.shield(self._unlinks.start(victims, self._files.unlink_all, victims))
            buffered: list[bytes] = []
            pending = 0
            async for chunk in chunks:
                if not chunk:
                    continue
                buffered.append(chunk)
                pending += len(chunk)
                if self.verify and tmp.verifier.received + pending > digest.size:
                    raise DigestMismatch(
                        f"upload for {digest} has more than the {digest.size} bytes its digest names"
                    )
                if pending >= CHUNK_SIZE:
                    tmp.started = True
                    await asyncio.to_thread(tmp.append, buffered)
                    buffered, pending = [], 0
            if not self.verify:
                extra = tmp.verifier.received + pending
                victims = self._reserve(extra)
                reserved += extra
                if victims:
                    await asyncio.shield(self._unlinks.start(victims, self._files.unlink_all, victims))
            index.begin_commit((digest,))
            committing = True
            await self._unlinks.wait((digest,))
            tmp.started = True
            loop = asyncio.get_running_loop()
            stored, cancelled = await run_to_end(loop.run_in_executor(None, tmp.commit, buffered,
                                                                      self._files.path(digest)))
        except BaseException:
            if tmp.started:
                # Runs after any append still in flight (the file's lock orders them),
                # so the temporary file cannot reappear behind the unlink.
                await asyncio.to_thread(tmp.discard)
            raise
        finally:
            index.release(reserved)
            if committing:
                index.end_commit((digest,))
            if stored >= 0:
                self._add(digest, stored)
        if cancelled:
            raise asyncio.CancelledError

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        index = self._index
        results: list[Exception | None] = [None] * len(blobs)
        todo: list[tuple[int, Digest, bytes]] = []
        now = time.time()
        for pos, (digest, data) in enumerate(blobs):
            if self.verify:
                if len(data) != digest.size:
                    results[pos] = DigestMismatch(
                        f"upload for {digest} has {len(data)} bytes, its digest names {digest.size}"
                    )
                    continue
                if index.touch(digest, now) is not None:
                    continue
            todo.append((pos, digest, data))
        self._schedule_touch()
        if not todo:
            return results
        committing = [digest for _, digest, _ in todo]
        index.begin_commit(committing)  # before making room: never evict what this batch writes
        reserved = 0
        victims: list[Digest] = []
        positions: list[int] = []
        accepted: list[tuple[Digest, bytes]] = []
        try:
            for pos, digest, data in todo:
                try:
                    victims.extend(index.reserve(len(data)))
                except ResourceExhausted as exc:
                    results[pos] = exc
                    continue
                reserved += len(data)
                positions.append(pos)
                accepted.append((digest, data))
            self._note_evicted(victims)
            await self._unlinks.wait(d for d, _ in accepted)
            hop = self._unlinks.start(victims, self._files.write_batch, victims, accepted, self.verifier)
            outcome, cancelled = await run_to_end(hop)
        finally:
            index.release(reserved)
            index.end_commit(committing)
        for pos, (digest, data), error in zip(positions, accepted, outcome, strict=True):
            if error is None:
                self._add(digest, len(data))
            else:
                results[pos] = error
        if cancelled:
            raise asyncio.CancelledError
        return results

    def _add(self, digest: Digest, size: int) -> None:
        if self._journal is not None:
            self._journal.note_added(digest, size)
            self._journal.start(self._index.apply_changes)
        victims = self._index.add(digest, size)
        if victims:  # only after writes whose size was not known up front (verify=False)
            self._note_evicted(victims)
            self._unlinks.start(victims, self._files.unlink_all, victims)

    # -- quota --------------------------------------------------------------------

    def _reserve(self, size: int) -> list[Digest]:
        """Reserve room for a write (see `DiskIndex.reserve`); the victims' files must go."""
        victims = self._index.reserve(size)
        self._note_evicted(victims)
        return victims

    def _note_evicted(self, victims: list[Digest]) -> None:
        if not victims:
            return
        if self._journal is not None:
            for digest in victims:
                self._journal.note_removed(digest)
        log.debug("disk storage %s: evicting %d blobs", self.root, len(victims))

    # -- last-use persistence ------------------------------------------------------

    def _schedule_touch(self) -> None:
        self._last_use.schedule(_TOUCH_INTERVAL)

    async def flush_touches(self) -> None:
        """Write recorded last-use times to the files' mtimes (what a restart orders by)."""
        await self._last_use.flush()

    # -- maintenance ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> int:
        """Remove blobs.  A blob being committed by a concurrent writer stays (the
        write wins); a blob being read is removed from the index at once, and its
        readers finish from the open file."""
        index = self._index
        present = []
        for digest in digests:
            if index.is_committing(digest):
                continue
            if index.remove(digest) is not None:
                present.append(digest)
                if self._journal is not None:
                    self._journal.note_removed(digest)
        if present:
            await asyncio.shield(self._unlinks.start(present, self._files.unlink_all, present))
        return len(present)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        for digest, size, last_use in self._index.snapshot(time.time()):
            yield BlobInfo(digest, size, last_use)

    async def stats(self) -> dict[str, int]:
        index = self._index
        return {"bytes": index.used, "objects": len(index), "quota_bytes": self.max_bytes,
                "reserved_bytes": index.reserved, "evictions": index.evictions}

    async def close(self) -> None:
        await self._unlinks.drain()
        await self._last_use.close()
        if self._journal is not None:
            await self._journal.close()


class DiskOptions(NodeOptions):
    path: str
    max_size: int | str = Field(default=0, alias="max-size")
    fsync: bool = False


@register("disk", DiskOptions)
def _build(options: DiskOptions, loader: StorageLoader, path: str) -> DiskStorage:
    return DiskStorage(
        path=options.path, max_bytes=parse_size(options.max_size), fsync=options.fsync,
        verify=options.verify, name=path, maintenance=loader.maintenance, journal=loader.shared_directories,
    )
