"""`disk`: one file per blob under a data directory, with a byte quota and LRU eviction.

Layout: `objects/<2 hex>/<key>` (key = `hash-size`, or `blake3-hash-size`) and
`tmp/` for writes in progress.  A write goes to `tmp/`, is hashed as it is written,
and is renamed into `objects/` only once verified, so a reader (or a restart after
SIGKILL) never sees a partial blob; `tmp/` is emptied at startup, and an object
file whose size is not the one its name says (a machine crash without fsync) is
removed then too.

The index of what is stored (and in which LRU order) lives in memory, built once
at startup from one scan: FindMissingBlobs is then a dictionary lookup, and no
request rescans the tree.  Last use survives restarts approximately: the time of
each use is recorded, written to the files' mtimes in the background (and on
close), and the startup scan orders by mtime.

Quota: `_used` counts indexed bytes, `_reserved` the bytes of writes in flight;
a write reserves its size before reading any data (evicting least recently used
blobs to make room), so concurrent writes cannot overshoot the quota together.
Blobs that are being read, or committed by a writer, are pinned and never
evicted; when only pinned blobs could make room the write fails with
RESOURCE_EXHAUSTED and nothing is evicted.

Blocking work runs in threads, one hop per chunk (1 MiB) or per batch.  Files are
only ever unlinked and renamed-over under ordering rules (see `_unlinking` and
`_committing`) so that an eviction racing a re-upload of the same blob cannot
leave the index naming a file that is gone.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, DigestMismatch, ResourceExhausted
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, check_range, empty_stream
from casbah.storage.disk_files import _FileReader, _parse_key, _pread_all, _run_to_end, _single, _TmpFile
from casbah.storage.disk_journal import Journal
from casbah.storage.loader import NodeOptions, register

log = logging.getLogger(__name__)

_TOUCH_INTERVAL = 60.0


class DiskStorage(Storage):
    kind = "disk"

    def __init__(self, *, path: str | os.PathLike, max_bytes: int = 0, fsync: bool = False,
                 maintenance: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        #: Opened beside a live server (admin commands): leave its tmp/ alone.
        self.maintenance = maintenance
        self.root = Path(path)
        self.max_bytes = max_bytes  # 0 = no quota
        self.fsync = fsync
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        #: digest -> stored size, least recently used first.
        self._index: OrderedDict[Digest, int] = OrderedDict()
        self._used = 0
        self._reserved = 0
        #: Open read streams per digest: never evicted while > 0.
        self._pins: dict[Digest, int] = {}
        #: Writers renaming a file into place per digest: never evicted or deleted
        #: meanwhile, or the unlink could land after the rename.
        self._committing: dict[Digest, int] = {}
        #: Digests whose file an unlink hop is removing: a writer of one of them
        #: waits for that hop before renaming its file into place.
        self._unlinking: dict[Digest, asyncio.Future] = {}
        #: Last use (time.time()) of blobs used since the last flush to mtimes.
        self._touched: dict[Digest, float] = {}
        self._touch_task: asyncio.Task | None = None
        self._counter = itertools.count()
        self.evictions = 0
        self._open()
        #: Several server processes share this directory (`serve --workers N`).
        self._journal = Journal(self.root / "journal", _parse_key) if os.environ.get("CASBAH_WORKERS") else None
        if self._journal is not None:
            self._journal.start(self._apply_journal)  # replay siblings' changes from the start, not after a write

    # -- startup -------------------------------------------------------------------

    def _open(self) -> None:
        started = time.monotonic()
        for prefix in range(256):
            (self._objects / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        orphans = 0
        for entry in () if self.maintenance else os.scandir(self._tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            orphans += 1
        found: list[tuple[int, Digest, int]] = []
        dropped = 0
        for prefix in os.scandir(self._objects):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                digest = _parse_key(entry.name)
                st = entry.stat(follow_symlinks=False)
                if (
                    digest is None
                    or not entry.is_file(follow_symlinks=False)
                    or digest.hash[:2] != prefix.name
                    or (self.verify and st.st_size != digest.size)
                ):
                    # Not ours, or truncated by a crash of the machine (not of casbah,
                    # whose renames are atomic): never serve it.
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path, ignore_errors=True)
                    else:
                        os.unlink(entry.path)
                    dropped += 1
                    continue
                found.append((st.st_mtime_ns, digest, st.st_size))
        found.sort(key=lambda item: item[0])
        for _, digest, size in found:
            self._index[digest] = size
            self._used += size
        log.info(
            "disk storage %s: %d blobs, %d bytes (quota %s); removed %d partial uploads and %d bad files in %.2fs",
            self.root, len(self._index), self._used, self.max_bytes or "none", orphans, dropped,
            time.monotonic() - started,
        )

    def _path(self, digest: Digest) -> str:
        return f"{self._objects}/{digest.hash[:2]}/{digest.key}"

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        index = self._index
        missing = []
        touched = self._touched
        now = time.time()
        for digest in digests:
            if digest in index:
                index.move_to_end(digest)
                touched[digest] = now
            else:
                missing.append(digest)
        if missing and self._journal is not None:
            # A sibling worker may have stored some within the last journal interval:
            # check their files, in one thread hop for the whole request.
            sizes = await asyncio.to_thread(self._stat_many, missing)
            still = []
            for digest, size in zip(missing, sizes, strict=True):
                if size is not None and (not self.verify or size == digest.size) and digest not in index:
                    index[digest] = size
                    self._used += size
                elif size is None:
                    still.append(digest)
            missing = still
        self._schedule_touch()
        return missing

    async def has(self, digest: Digest) -> bool:
        return digest in self._index or self._discover(digest)

    def _stat_many(self, digests: list[Digest]) -> list[int | None]:
        sizes: list[int | None] = []
        for digest in digests:
            try:
                sizes.append(os.stat(self._path(digest)).st_size)
            except FileNotFoundError:
                sizes.append(None)
        return sizes

    def _discover(self, digest: Digest) -> bool:
        """With sibling workers, a blob may be on disk before its journal line is replayed."""
        if self._journal is None:
            return False
        try:
            size = os.stat(self._path(digest)).st_size
        except FileNotFoundError:
            return False
        if self.verify and size != digest.size:
            return False
        self._index[digest] = size
        self._used += size
        return True

    def _apply_journal(self, entries: list[tuple[str, Digest, int]]) -> None:
        index = self._index
        for op, digest, size in entries:
            if op == "+":
                if digest not in index:
                    index[digest] = size
                    self._used += size
            elif digest in index and digest not in self._pins and digest not in self._committing:
                self._used -= index.pop(digest)

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        size = self._lookup(digest)
        count = check_range(digest, size, offset, limit)
        if count == 0:
            return empty_stream()
        self._pin(digest)
        if count <= CHUNK_SIZE:
            try:
                data = await asyncio.to_thread(self._read_range, digest, offset, count)
            finally:
                self._unpin(digest)
            if data is None or (self.verify and len(data) != count):
                self._lost(digest, data is not None)
            return _single(data)
        try:
            handle = await asyncio.to_thread(self._open_at, digest)
        except BaseException:
            self._unpin(digest)
            raise
        if handle is None:
            self._unpin(digest)
            self._lost(digest, False)
        return _FileReader(self, digest, handle, offset, count)

    async def find_by_hash(self, hash_hex: str, function: DigestFunction) -> Digest | None:
        """The stored blob with this hash, whatever its size, or None.

        For protocols that name blobs by hash alone (the HTTP cache protocol): one
        listing of the blob's prefix directory, so a fallback, not a per-request path.
        """
        stem = Digest(hash_hex, 0, function).key[:-1]  # the key without its size: `hash-`
        try:
            names = await asyncio.to_thread(os.listdir, f"{self._objects}/{hash_hex[:2]}")
        except OSError:
            return None
        for name in names:
            if name.startswith(stem) and (digest := _parse_key(name)) is not None and digest in self._index:
                return digest
        return None

    def _lookup(self, digest: Digest) -> int:
        try:
            size = self._index[digest]
        except KeyError:
            if not self._discover(digest):
                raise BlobNotFound(digest) from None
            size = self._index[digest]
        self._index.move_to_end(digest)
        self._touch(digest)
        return size

    def _read_range(self, digest: Digest, offset: int, count: int) -> bytes | None:
        try:
            fd = os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            return _pread_all(fd, offset, count)
        finally:
            os.close(fd)

    def _open_at(self, digest: Digest) -> int | None:
        try:
            return os.open(self._path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def _lost(self, digest: Digest, truncated: bool) -> None:
        """A file the index names is gone or short: stop naming it, and say NOT_FOUND.

        Only happens when something outside casbah removed or damaged the file
        (or an explicit delete raced the read); the blob must then stop being
        reported present, or FindMissingBlobs would keep lying about it.
        """
        if truncated:
            if digest in self._index and digest not in self._committing:
                self._used -= self._index.pop(digest)
                self._start_unlinks([digest], self._unlink_all, [digest])
            raise BlobNotFound(digest, "its file on disk is truncated; removed")
        if digest in self._index and not os.path.exists(self._path(digest)):
            self._used -= self._index.pop(digest)
        raise BlobNotFound(digest, "removed from disk behind casbah's back")

    async def read_bytes(self, digest: Digest) -> bytes:
        size = self._lookup(digest)
        self._pin(digest)
        try:
            if self.verify:
                data = await asyncio.to_thread(self._read_range, digest, 0, size)
            else:  # an entry may be overwritten (with another size) at any time: read it whole
                data = (await asyncio.to_thread(self._read_batch, [digest])).get(digest)
        finally:
            self._unpin(digest)
        if data is None or (self.verify and len(data) != size):
            self._lost(digest, data is not None)
        return data

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        index = self._index
        present = [d for d in digests if d in index or self._discover(d)]
        if not present:
            return {}
        for digest in present:
            index.move_to_end(digest)
            self._touch(digest)
            self._pin(digest)
        try:
            found = await asyncio.to_thread(self._read_batch, present)
        finally:
            for digest in present:
                self._unpin(digest)
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

    def _read_batch(self, digests: list[Digest]) -> dict[Digest, bytes]:
        found = {}
        path = self._path
        for digest in digests:
            try:
                with open(path(digest), "rb", buffering=0) as f:
                    found[digest] = f.readall()
            except FileNotFoundError:
                continue
        return found

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if self.verify and digest in self._index:
            self._index.move_to_end(digest)
            self._touch(digest)
            return  # content-addressed: the stored bytes are these bytes
        # With verification the size is known up front: reserve it before reading any
        # data.  Without (ActionCache entries), the size is known only at the end.
        reserved = digest.size if self.verify else 0
        victims = self._make_room(reserved)
        self._reserved += reserved
        tmp = _TmpFile(self._tmp_path(digest), self.verifier(digest), self.fsync)
        committing = False
        stored = -1
        cancelled = False
        try:
            if victims:
                await asyncio.shield(self._start_unlinks(victims, self._unlink_all, victims))
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
                victims = self._make_room(extra)
                self._reserved += extra
                reserved += extra
                if victims:
                    await asyncio.shield(self._start_unlinks(victims, self._unlink_all, victims))
            self._begin_commit(digest)
            committing = True
            await self._wait_unlinked((digest,))
            tmp.started = True
            loop = asyncio.get_running_loop()
            stored, cancelled = await _run_to_end(loop.run_in_executor(None, tmp.commit, buffered, self._path(digest)))
        except BaseException:
            if tmp.started:
                # Runs after any append still in flight (the file's lock orders them),
                # so the temporary file cannot reappear behind the unlink.
                await asyncio.to_thread(tmp.discard)
            raise
        finally:
            self._reserved -= reserved
            if committing:
                self._end_commit(digest)
            if stored >= 0:
                self._add(digest, stored)
        if cancelled:
            raise asyncio.CancelledError

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results: list[Exception | None] = [None] * len(blobs)
        todo: list[tuple[int, Digest, bytes]] = []
        for pos, (digest, data) in enumerate(blobs):
            if self.verify:
                if len(data) != digest.size:
                    results[pos] = DigestMismatch(
                        f"upload for {digest} has {len(data)} bytes, its digest names {digest.size}"
                    )
                    continue
                if digest in self._index:
                    self._index.move_to_end(digest)
                    self._touch(digest)
                    continue
            todo.append((pos, digest, data))
        if not todo:
            return results
        for _, digest, _ in todo:  # before making room: never evict what this batch writes
            self._begin_commit(digest)
        reserved = 0
        victims: list[Digest] = []
        accepted: list[tuple[int, Digest, bytes]] = []
        try:
            for pos, digest, data in todo:
                try:
                    victims.extend(self._make_room(len(data)))
                except ResourceExhausted as exc:
                    results[pos] = exc
                    continue
                self._reserved += len(data)
                reserved += len(data)
                accepted.append((pos, digest, data))
            await self._wait_unlinked(d for _, d, _ in accepted)
            hop = self._start_unlinks(victims, self._unlink_and_write, victims, accepted)
            outcome, cancelled = await _run_to_end(hop)
        finally:
            self._reserved -= reserved
            for _, digest, _ in todo:
                self._end_commit(digest)
        for (pos, digest, data), error in zip(accepted, outcome, strict=True):
            if error is None:
                self._add(digest, len(data))
            else:
                results[pos] = error
        if cancelled:
            raise asyncio.CancelledError
        return results

    def _unlink_and_write(
        self, victims: list[Digest], blobs: list[tuple[int, Digest, bytes]]
    ) -> list[Exception | None]:
        """One thread hop for a whole batch: evict what must go, then store each blob."""
        self._unlink_all(victims)
        errors: list[Exception | None] = []
        for _, digest, data in blobs:
            tmp = _TmpFile(self._tmp_path(digest), self.verifier(digest), self.fsync)
            try:
                tmp.commit([data], self._path(digest))
                errors.append(None)
            except Exception as exc:
                tmp.discard()
                errors.append(exc)
        return errors

    def _tmp_path(self, digest: Digest) -> str:
        return f"{self._tmp}/{digest.key}.{os.getpid()}.{next(self._counter)}"

    def _add(self, digest: Digest, size: int) -> None:
        if self._journal is not None:
            self._journal.note_added(digest, size)
            self._journal.start(self._apply_journal)
        old = self._index.pop(digest, None)
        if old is not None:
            self._used -= old
        self._index[digest] = size
        self._used += size
        if self.max_bytes and self._used + self._reserved > self.max_bytes:
            # Only after writes whose size was not known up front (verify=False).
            try:
                victims = self._make_room(0)
            except ResourceExhausted:
                return
            if victims:
                self._start_unlinks(victims, self._unlink_all, victims)

    # -- quota ---------------------------------------------------------------------

    def _make_room(self, size: int) -> list[Digest]:
        """Take least recently used blobs out of the index until `size` more bytes fit.

        Returns the victims, whose files the caller must unlink (`_start_unlinks`).
        Raises ResourceExhausted, having changed nothing, when the blob is larger
        than the quota or only pinned blobs could make room.
        """
        if not self.max_bytes:
            return []
        if size > self.max_bytes:
            raise ResourceExhausted(f"blob of {size} bytes is larger than the disk quota ({self.max_bytes} bytes)")
        excess = self._used + self._reserved + size - self.max_bytes
        if excess <= 0:
            return []
        index = self._index
        busy = self._pins.keys() | self._committing.keys()
        busy_bytes = sum(index.get(d, 0) for d in busy)
        if self._used - busy_bytes < excess:
            raise ResourceExhausted(
                f"disk quota of {self.max_bytes} bytes is full of blobs in use or being written; "
                f"cannot store {size} more bytes"
            )
        victims: list[Digest] = []
        skipped: list[tuple[Digest, int]] = []
        freed = 0
        while freed < excess:
            digest, stored = index.popitem(last=False)
            if digest in busy:
                skipped.append((digest, stored))
                continue
            victims.append(digest)
            freed += stored
        for digest, stored in skipped:  # in use: keep them, as most recently used
            index[digest] = stored
        self._used -= freed
        self.evictions += len(victims)
        if self._journal is not None:
            for digest in victims:
                self._journal.note_removed(digest)
        log.debug("disk storage %s: evicting %d blobs (%d bytes)", self.root, len(victims), freed)
        return victims

    def _start_unlinks(self, victims: list[Digest], fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` (which unlinks `victims` first) in a thread and return its
        future (await it shielded).  Until it finishes, writers of the victims wait."""
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        if victims:
            unlinking = self._unlinking
            for digest in victims:
                unlinking[digest] = future
            future.add_done_callback(functools.partial(self._unlinked, victims))
        return future

    def _unlinked(self, victims: list[Digest], future: asyncio.Future) -> None:
        for digest in victims:
            if self._unlinking.get(digest) is future:
                del self._unlinking[digest]

    async def _wait_unlinked(self, digests: Iterable[Digest]) -> None:
        unlinking = self._unlinking
        if not unlinking:
            return
        pending = {unlinking[d] for d in digests if d in unlinking}
        if pending:
            await asyncio.wait(pending)

    def _unlink_all(self, digests: list[Digest]) -> None:
        for digest in digests:
            try:
                os.unlink(self._path(digest))
            except FileNotFoundError:
                pass
            except OSError as exc:  # the index has forgotten it already: log, do not fail the caller
                log.warning("disk storage %s: cannot remove %s: %s", self.root, digest, exc)

    def _pin(self, digest: Digest) -> None:
        self._pins[digest] = self._pins.get(digest, 0) + 1

    def _unpin(self, digest: Digest) -> None:
        count = self._pins.pop(digest, 1) - 1
        if count > 0:
            self._pins[digest] = count

    def _begin_commit(self, digest: Digest) -> None:
        self._committing[digest] = self._committing.get(digest, 0) + 1

    def _end_commit(self, digest: Digest) -> None:
        count = self._committing.pop(digest, 1) - 1
        if count > 0:
            self._committing[digest] = count

    # -- last-use persistence ------------------------------------------------------

    def _touch(self, digest: Digest) -> None:
        self._touched[digest] = time.time()
        self._schedule_touch()

    def _schedule_touch(self) -> None:
        if self._touch_task is None and self._touched:
            try:
                self._touch_task = asyncio.get_running_loop().create_task(self._touch_later())
            except RuntimeError:
                pass

    async def _touch_later(self) -> None:
        await asyncio.sleep(_TOUCH_INTERVAL)
        self._touch_task = None
        await self.flush_touches()

    async def flush_touches(self) -> None:
        """Write recorded last-use times to the files' mtimes (what a restart orders by)."""
        touched, self._touched = self._touched, {}
        if touched:
            await asyncio.to_thread(self._utime_all, touched)

    def _utime_all(self, touched: dict[Digest, float]) -> None:
        for digest, when in touched.items():
            try:
                os.utime(self._path(digest), (when, when))
            except FileNotFoundError:
                pass

    # -- maintenance ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> int:
        """Remove blobs.  A blob being committed by a concurrent writer stays (the
        write wins); a blob being read is removed from the index at once, and its
        readers finish from the open file."""
        present = []
        for digest in digests:
            if digest in self._committing:
                continue
            size = self._index.pop(digest, None)
            if size is not None:
                self._used -= size
                self._touched.pop(digest, None)
                present.append(digest)
                if self._journal is not None:
                    self._journal.note_removed(digest)
        if present:
            await asyncio.shield(self._start_unlinks(present, self._unlink_all, present))
        return len(present)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        now = time.time()
        touched = self._touched
        for digest, size in list(self._index.items()):
            yield BlobInfo(digest, size, touched.get(digest, now))

    async def stats(self) -> dict[str, int]:
        return {
            "bytes": self._used,
            "objects": len(self._index),
            "quota_bytes": self.max_bytes,
            "reserved_bytes": self._reserved,
            "evictions": self.evictions,
        }

    async def close(self) -> None:
        if self._touch_task is not None:
            self._touch_task.cancel()
            self._touch_task = None
        if self._unlinking:
            await asyncio.wait(set(self._unlinking.values()))
        await self.flush_touches()
        if self._journal is not None:
            await self._journal.close()


class DiskOptions(NodeOptions):
    path: str
    max_size: int | str = Field(default=0, alias="max-size")
    fsync: bool = False


@register("disk", DiskOptions)
def _build(options: DiskOptions, loader: object, path: str) -> DiskStorage:
    return DiskStorage(
        path=options.path, max_bytes=parse_size(options.max_size), fsync=options.fsync,
        verify=options.verify, name=path, maintenance=getattr(loader, "maintenance", False),
    )
