"""`disk`: small blobs inline in an LMDB index, large ones as files; a quota on real bytes.

The persistent local storage engine (`casbah/storage/engine/`) as a Storage.

Small blobs live inline in an LMDB index, large ones as files; the quota counts bytes
really used on disk; startup is O(1); several processes (`serve --workers N`) share
one store.  See docs/storage-engine.md.  This module only orders the engine's calls
against the event loop: reads of metadata and small blobs run in the loop (they
never write and touch mapped pages), every write transaction and every file hop runs
in a thread, and last use is flushed in the background.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
from collections.abc import AsyncIterable, AsyncIterator, Callable, Sequence
from typing import Any

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, CasbahError, DataLoss, DigestMismatch, from_os_error
from casbah.storage.base import (
    CHUNK_SIZE,
    BlobInfo,
    BlobsLost,
    ReadVerifier,
    Storage,
    Verifier,
    check_range,
    empty_stream,
    verified_range,
)
from casbah.storage.engine import Engine
from casbah.storage.engine.check import ChecksumVerifier
from casbah.storage.engine.core import TOUCH_BATCH, corrupt_error
from casbah.storage.engine.files import OpenFile, run_to_end, stream_file
from casbah.storage.engine.index import FILE, key_of
from casbah.storage.loader import NodeOptions, StorageLoader, register

log = logging.getLogger(__name__)

#: Seconds between flushes of last-use updates.
TOUCH_INTERVAL = 2.0
#: FindMissingBlobs batches of at least this many digests may look up in a thread: a
#: lookup whose index page is not in the page cache blocks on the disk (py-lmdb releases
#: the GIL in it), so in a thread the event loop keeps serving and several batches have
#: faults in flight.  With the pages cached a thread only costs: a hop is ~70-250 µs of
#: CPU, and threads looking up at once hand the GIL to each other at every lookup (measured:
#: 4 concurrent batches in threads ran at 0.56x the speed of the same batches in the loop).
#: So the next batch goes to a thread only after a batch took a major page fault, and
#: batches come back to the loop as soon as one in a thread took none.
FMB_THREAD_MIN = 64


class DiskStorage(Storage):
    kind = "disk"

    def __init__(self, *, path: str | os.PathLike, max_bytes: int = 0, fsync: bool = False,
                 maintenance: bool = False, inline_max: int | None = None, map_size: int = 0,
                 write_behind: bool = False, **kwargs: Any) -> None:
        """`maintenance`: opened beside a live server (admin commands): leave its tmp/ alone."""
        kwargs.pop("journal", None)
        super().__init__(**kwargs)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self._lock_fd, alone = _open_lock(path)
        extra = {"inline_max": inline_max} if inline_max is not None else {}
        try:
            self.engine = Engine(path, max_bytes=max_bytes, durable=fsync, map_size=map_size, verify=self.verify,
                                 clear_tmp=not maintenance and alone, name=self.name, **extra)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self.engine.area.write_behind = write_behind
        if not maintenance:
            self.engine.warm_index()  # a server: read the index into the page cache in the background
        _share_lock(self._lock_fd)
        self.root = self.engine.root
        self._flusher: asyncio.Task | None = None
        #: The last large FindMissingBlobs batch took a major page fault (the index is not all cached).
        self._faulting = False

    # -- existence -----------------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        if len(digests) < FMB_THREAD_MIN:
            missing = self.engine.missing(digests)
        elif self._faulting:
            missing, self._faulting = await asyncio.to_thread(_counting_faults, self.engine.missing, digests)
        else:
            missing, self._faulting = _counting_faults(self.engine.missing, digests)
        self._touched()
        return missing

    async def has(self, digest: Digest) -> bool:
        return not self.engine.missing([digest])

    async def find_by_hash(self, hash_hex: str, function: DigestFunction) -> Digest | None:
        """The stored blob with this hash, whatever its size, or None: for protocols that
        name blobs by hash alone (the HTTP cache protocol).  One index lookup: keys start
        with the function and the hash, so the blob is the first key at or after them."""
        return self.engine.find_by_hash(hash_hex, function)

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        engine = self.engine
        record = engine.lookup(digest)
        if record is None:
            raise BlobNotFound(digest)
        self._touched()
        size = record.length
        count = check_range(digest, size, offset, limit)
        if count == 0 and (offset or size == 0):
            return empty_stream()
        if record.where != FILE:
            data = await self._read_inline(digest)
            return _one(data[offset:offset + count])
        checked = engine.file_check(digest)
        if checked is None:
            raise BlobNotFound(digest)
        record, check = checked
        if record.length != size:  # an ActionCache entry rewritten meanwhile: serve the new one whole
            size = record.length
            count = check_range(digest, size, offset, limit)
        key = key_of(digest)
        engine.pin(key)
        fd = engine.open_file(digest)
        if fd is None:
            engine.unpin(key)
            await asyncio.to_thread(engine.drop, [digest])
            raise BlobNotFound(digest, "its file was removed behind casbah's back")
        handle = OpenFile(fd, lambda: engine.unpin(key))
        verifier: Verifier
        if check is not None:  # the checksum stored at write (check.py); the ActionCache's entries too
            verifier = ChecksumVerifier(digest, record.length, check, self.describe())
        elif self.verify:  # an entry older code wrote: the digest function
            verifier = ReadVerifier(digest, self.describe())
        else:
            return _sliced(stream_file(handle, size, self.verifier(digest)), offset, count)
        stream = stream_file(handle, record.length, verifier)
        return self._dropping(digest, verified_range(stream, verifier, offset, count, hashed=True), check)

    async def _dropping(self, digest: Digest, stream: AsyncIterator[bytes],
                        check: bytes | None = None) -> AsyncIterator[bytes]:
        """Pass a verified stream on; a mismatch drops the blob before DATA_LOSS reaches the client.
        An ActionCache entry (whose content may change under one key) is dropped only if
        it still has the checksum the read used: one rewritten meanwhile is not corrupt."""
        try:
            async for chunk in stream:
                yield chunk
        except DataLoss:
            if not self.verify and check is not None:
                now = await asyncio.to_thread(self.engine.file_check, digest)
                if now is not None and now[1] != check:
                    raise
            await asyncio.to_thread(self.engine.drop, [digest])
            raise corrupt_error(digest, self.name) from None

    async def _read_inline(self, digest: Digest) -> bytes:
        found, corrupt, _files = self.engine.get_inline([digest])
        self._touched()
        if corrupt:
            await asyncio.to_thread(self.engine.drop, corrupt)
            raise corrupt_error(digest, self.name)
        if digest not in found:
            raise BlobNotFound(digest)
        return found[digest]

    async def read_bytes(self, digest: Digest) -> bytes:
        stream = await self.read(digest)
        return b"".join([chunk async for chunk in stream])

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """Inline blobs are read and hashed in the event loop: a thread hop per batch cost
        more server CPU than it saved (measured: 25.5 against 15 µs a blob, bench batch_read)."""
        found, corrupt, files = self.engine.get_inline(digests)
        self._touched()
        lost: dict[Digest, CasbahError] = {}
        if corrupt:
            await asyncio.to_thread(self.engine.drop, corrupt)
            lost = {d: corrupt_error(d, self.name) for d in corrupt}
        for digest in files:
            try:
                found[digest] = await self.read_bytes(digest)
            except BlobNotFound:
                pass
            except DataLoss as exc:
                lost[digest] = exc
        if lost:
            raise BlobsLost(found, lost)
        return found

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Small blobs are gathered (at most the inline threshold) and stored like a
        batch; larger ones stream into tmp/.  Nothing is reserved for the size a
        digest claims: bytes count once verified and committed, so a false claim
        evicts nothing and blocks nobody."""
        engine = self.engine
        limit = engine.inline_max
        gathered: list[bytes] = []
        pending = 0
        tmp = None
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                received = (tmp.verifier.received if tmp is not None else 0) + pending + len(chunk)
                if self.verify and received > digest.size:
                    raise DigestMismatch(f"upload for {digest} has more than the {digest.size} bytes its digest names")
                gathered.append(chunk)
                pending += len(chunk)
                if tmp is None and pending > limit:
                    tmp = engine.area.new_tmp(digest, self.verifier(digest))
                if tmp is not None and pending >= CHUNK_SIZE:
                    tmp.started = True
                    await self._append(tmp, gathered)
                    gathered, pending = [], 0
            if tmp is None:
                error = (await asyncio.to_thread(engine.put_many, [(digest, b"".join(gathered))]))[0]
                if error is not None:
                    raise error
                return
            tmp.started = True
            _result, cancelled = await run_to_end(asyncio.get_running_loop().run_in_executor(
                None, engine.put_file, digest, tmp, gathered))
        except BaseException:
            if tmp is not None and tmp.started:
                await asyncio.to_thread(tmp.discard)
            raise
        if cancelled:
            raise asyncio.CancelledError

    async def _append(self, tmp: Any, chunks: list[bytes]) -> None:
        try:
            await asyncio.to_thread(tmp.append, chunks)
        except OSError as exc:
            raise from_os_error(exc, f"disk storage {self.name}")  # noqa: B904 - keeps the OSError cause

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        error = (await self.write_many([(digest, data)]))[0]
        if error is not None:
            raise error

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        """One thread hop and one write transaction for the whole batch, hashing included."""
        if not blobs:
            return []
        outcome, cancelled = await run_to_end(asyncio.get_running_loop().run_in_executor(
            None, self.engine.put_many, blobs))
        if cancelled:
            raise asyncio.CancelledError
        return outcome

    # -- maintenance ---------------------------------------------------------------

    def _touched(self) -> None:
        engine = self.engine
        if not (engine.touched or engine.dangling) or self._flusher is not None:
            return
        try:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())
        except RuntimeError:
            pass

    async def _flush_later(self) -> None:
        try:
            for _ in range(int(TOUCH_INTERVAL / 0.25)):
                if len(self.engine.touched) >= TOUCH_BATCH:
                    break
                await asyncio.sleep(0.25)
            await asyncio.to_thread(self.engine.flush_touches)
        finally:
            self._flusher = None

    async def flush_touches(self) -> None:
        await asyncio.to_thread(self.engine.flush_touches)

    async def delete(self, digests: Sequence[Digest]) -> int:
        return await asyncio.to_thread(self.engine.drop, digests)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        pages = self.engine.iterate()
        while True:
            rows = await asyncio.to_thread(_take, pages, 1000)
            for digest, record in rows:
                yield BlobInfo(digest, record.length, float(record.seq))
            if len(rows) < 1000:
                return

    async def stats(self) -> dict[str, int]:
        return self.engine.stats()

    async def gc(self) -> int:
        return await asyncio.to_thread(self.engine.gc)

    async def evict_to(self, target: int) -> int:
        return await asyncio.to_thread(self.engine.evict_to, target)

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        await asyncio.to_thread(self.engine.close)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _major_faults() -> int:
    """Major page faults of this thread so far (a syscall of ~1 µs)."""
    return resource.getrusage(resource.RUSAGE_THREAD).ru_majflt


def _counting_faults(missing: Callable[[Sequence[Digest]], Sequence[Digest]],
                     digests: Sequence[Digest]) -> tuple[Sequence[Digest], bool]:
    """`missing(digests)` and whether it took a major page fault (counted in the thread it runs in)."""
    faults = _major_faults()
    out = missing(digests)
    return out, _major_faults() > faults


def _take(pages: Any, n: int) -> list:
    out = []
    for row in pages:
        out.append(row)
        if len(out) >= n:
            break
    return out


def _open_lock(path: str | os.PathLike) -> tuple[int, bool]:
    """Hold `open.lock` shared while the store is open; returns (fd, whether no other
    process has it open), so only a lone opener clears tmp/ (leftovers of writes a
    killed process never finished): workers of one server start together and share it."""
    import fcntl

    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, "open.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until `_share_lock`: others wait
        return fd, True
    except BlockingIOError:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd, False


def _share_lock(fd: int) -> None:
    """After a lone opener cleared tmp/: let other processes open the store too."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_SH)


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _sliced(stream: AsyncIterator[bytes], offset: int, count: int) -> AsyncIterator[bytes]:
    position = 0
    end = offset + count
    async for chunk in stream:
        start, position = position, position + len(chunk)
        lo, hi = max(start, offset), min(position, end)
        if hi > lo:
            yield chunk[lo - start:hi - start]


class DiskOptions(NodeOptions):
    path: str
    max_size: int | str = Field(default=0, alias="max-size",
                                description="quota in bytes really used on disk (0 = none)")
    fsync: bool = Field(default=False, description="durable mode: sync every transaction and file")
    map_size: int | str = Field(default=0, alias="map-size",
                                description="bound of the LMDB index file (0 = 256 GiB of address space)")
    write_behind: bool = Field(default=False, alias="write-behind",
                               description="drop large uploads from the page cache as they are written out")


@register("disk", DiskOptions)
def _build(options: DiskOptions, loader: StorageLoader, path: str) -> DiskStorage:
    return DiskStorage(
        path=options.path, max_bytes=parse_size(options.max_size), fsync=options.fsync,
        map_size=parse_size(options.map_size), verify=options.verify, name=path, maintenance=loader.maintenance,
        write_behind=options.write_behind,
    )
