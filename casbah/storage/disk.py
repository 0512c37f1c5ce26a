"""`disk`: one file per blob under a data directory, with a byte quota and LRU eviction.

Layout: `objects/<2 hex>/<key>` (key = `hash-size`, or `blake3-hash-size`) and
`tmp/` for writes in progress.  A write goes to `tmp/`, is hashed as it is written,
and is renamed into `objects/` only once verified, so a reader (or a restart after
SIGKILL) never sees a partial blob; `tmp/` is emptied at startup.

The index of what is stored (and in which LRU order) lives in memory, built once
at startup from one scan: FindMissingBlobs is then a dictionary lookup, and no
request rescans the tree.  Last use survives restarts approximately: touched
blobs get their mtime refreshed in the background, and the startup scan orders by
mtime.  Blobs that are being read are pinned and never evicted.

Blocking work runs in threads, one hop per chunk (1 MiB) or per batch.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from pathlib import Path

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, ResourceExhausted
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, Verifier, check_range
from casbah.storage.loader import NodeOptions, register

log = logging.getLogger(__name__)

_TOUCH_INTERVAL = 60.0
_FUNCTIONS = {f.value: f for f in DigestFunction}


class DiskStorage(Storage):
    kind = "disk"

    def __init__(self, *, path: str | os.PathLike, max_bytes: int = 0, fsync: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = Path(path)
        self.max_bytes = max_bytes  # 0 = no quota
        self.fsync = fsync
        self._objects = self.root / "objects"
        self._tmp = self.root / "tmp"
        self._index: OrderedDict[Digest, int] = OrderedDict()
        self._used = 0
        self._reserved = 0
        self._pins: dict[Digest, int] = {}
        self._pin_sizes: dict[Digest, int] = {}
        self._touched: set[Digest] = set()
        self._touch_task: asyncio.Task | None = None
        self._counter = itertools.count()
        self.evictions = 0
        self._open()

    # -- startup -------------------------------------------------------------------

    def _open(self) -> None:
        started = time.monotonic()
        for prefix in range(256):
            (self._objects / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        orphans = 0
        for entry in os.scandir(self._tmp):
            os.unlink(entry.path)
            orphans += 1
        found: list[tuple[float, Digest, int]] = []
        dropped = 0
        for prefix in os.scandir(self._objects):
            for entry in os.scandir(prefix.path):
                digest = _parse_key(entry.name)
                st = entry.stat()
                if digest is None or (self.verify and st.st_size != digest.size):
                    # Not ours, or truncated by a crash of the machine (not of casbah,
                    # whose renames are atomic): never serve it.
                    os.unlink(entry.path)
                    dropped += 1
                    continue
                found.append((st.st_mtime, digest, st.st_size))
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
        for digest in digests:
            if digest in index:
                index.move_to_end(digest)
                touched.add(digest)
            else:
                missing.append(digest)
        self._schedule_touch()
        return missing

    async def has(self, digest: Digest) -> bool:
        return digest in self._index

    # -- reads ---------------------------------------------------------------------

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        size = self._lookup(digest)
        count = check_range(digest, size, offset, limit)
        self._pin(digest)
        if count <= CHUNK_SIZE:
            try:
                data = await asyncio.to_thread(self._read_range, digest, offset, count)
            finally:
                self._unpin(digest)
            return _single(data)
        try:
            handle = await asyncio.to_thread(self._open_at, digest, offset)
        except BaseException:
            self._unpin(digest)
            raise
        return _FileReader(self, digest, handle, count)

    def _lookup(self, digest: Digest) -> int:
        try:
            size = self._index[digest]
        except KeyError:
            raise BlobNotFound(digest) from None
        self._index.move_to_end(digest)
        self._touched.add(digest)
        self._schedule_touch()
        return size

    def _read_range(self, digest: Digest, offset: int, count: int) -> bytes:
        try:
            with open(self._path(digest), "rb", buffering=0) as f:
                if offset:
                    f.seek(offset)
                return f.read(count) if count else b""
        except FileNotFoundError:
            raise BlobNotFound(digest, "removed from disk behind casbah's back") from None

    def _open_at(self, digest: Digest, offset: int):
        try:
            f = open(self._path(digest), "rb", buffering=0)
        except FileNotFoundError:
            raise BlobNotFound(digest, "removed from disk behind casbah's back") from None
        f.seek(offset)
        return f

    async def read_bytes(self, digest: Digest) -> bytes:
        size = self._lookup(digest)
        self._pin(digest)
        try:
            return await asyncio.to_thread(self._read_range, digest, 0, size)
        finally:
            self._unpin(digest)

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        index = self._index
        present = [d for d in digests if d in index]
        for digest in present:
            index.move_to_end(digest)
            self._touched.add(digest)
        self._schedule_touch()
        return await asyncio.to_thread(self._read_batch, present)

    def _read_batch(self, digests: list[Digest]) -> dict[Digest, bytes]:
        found = {}
        path = self._path
        for digest in digests:
            try:
                with open(path(digest), "rb", buffering=0) as f:
                    found[digest] = f.read()
            except FileNotFoundError:
                continue
        return found

    # -- writes --------------------------------------------------------------------

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if self.verify and digest in self._index:
            self._index.move_to_end(digest)
            return  # content-addressed: the stored bytes are these bytes
        reserved = await self._reserve(digest.size if self.verify else 0)
        verifier = self.verifier(digest)
        tmp = self._tmp_path(digest)
        handle = None
        try:
            buffered: list[bytes] = []
            pending = 0
            async for chunk in chunks:
                buffered.append(chunk)
                pending += len(chunk)
                if self.verify and verifier.received + pending > digest.size:
                    verifier.update(b"".join(buffered))  # raises DigestMismatch: too long
                if pending >= CHUNK_SIZE:
                    handle = await asyncio.to_thread(self._append, handle, tmp, verifier, buffered)
                    buffered, pending = [], 0
            size = await asyncio.to_thread(self._commit, handle, tmp, verifier, buffered, digest)
            handle = None
        except BaseException:
            await asyncio.to_thread(_discard, handle, tmp)
            raise
        finally:
            self._reserved -= reserved
        self._add(digest, size)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        todo = [(d, data) for d, data in blobs if not (self.verify and d in self._index)]
        reserved = await self._reserve(sum(len(data) for _, data in todo)) if todo else 0
        try:
            outcome = await asyncio.to_thread(self._write_batch, todo) if todo else {}
        finally:
            self._reserved -= reserved
        results: list[Exception | None] = []
        for digest, data in blobs:
            error = outcome.get(digest)
            if error is None:
                self._add(digest, len(data))
            results.append(error)
        return results

    def _write_batch(self, blobs: list[tuple[Digest, bytes]]) -> dict[Digest, Exception]:
        errors: dict[Digest, Exception] = {}
        for digest, data in blobs:
            tmp = self._tmp_path(digest)
            try:
                self._commit(None, tmp, self.verifier(digest), [data], digest)
            except Exception as exc:
                _discard(None, tmp)
                errors[digest] = exc
        return errors

    def _tmp_path(self, digest: Digest) -> str:
        return f"{self._tmp}/{digest.key}.{os.getpid()}.{next(self._counter)}"

    def _append(self, handle, tmp: str, verifier: Verifier, chunks: list[bytes]):
        if handle is None:
            handle = open(tmp, "wb", buffering=0)
        for chunk in chunks:
            verifier.update(chunk)
            handle.write(chunk)
        return handle

    def _commit(self, handle, tmp: str, verifier: Verifier, chunks: list[bytes], digest: Digest) -> int:
        """Write the tail, verify, and make the blob visible by an atomic rename."""
        if handle is None:
            handle = open(tmp, "wb", buffering=0)
        for chunk in chunks:
            verifier.update(chunk)
            handle.write(chunk)
        try:
            verifier.finish()
            if self.fsync:
                os.fsync(handle.fileno())
        finally:
            handle.close()
        os.replace(tmp, self._path(digest))
        return verifier.received

    def _add(self, digest: Digest, size: int) -> None:
        old = self._index.pop(digest, None)
        if old is not None:
            self._used -= old
        self._index[digest] = size
        self._used += size

    async def _reserve(self, size: int) -> int:
        """Make room for `size` more bytes by evicting least recently used blobs."""
        if not self.max_bytes:
            return 0
        if size > self.max_bytes:
            raise ResourceExhausted(f"blob of {size} bytes is larger than the disk quota ({self.max_bytes})")
        victims: list[Digest] = []
        skipped: list[Digest] = []
        index = self._index
        while self._used + self._reserved + size > self.max_bytes and index:
            digest, stored = index.popitem(last=False)
            if digest in self._pins:
                skipped.append(digest)
                continue
            victims.append(digest)
            self._used -= stored
        for digest in skipped:  # being read: keep them, as most recently used
            index[digest] = self._pin_sizes[digest]
        if self._used + self._reserved + size > self.max_bytes:
            raise ResourceExhausted(
                f"disk quota {self.max_bytes} is full of blobs in use; cannot store {size} more bytes"
            )
        self._reserved += size
        if victims:
            self.evictions += len(victims)
            log.debug("disk storage %s: evicting %d blobs", self.root, len(victims))
            await asyncio.to_thread(self._unlink_all, victims)
        return size

    def _unlink_all(self, digests: list[Digest]) -> None:
        for digest in digests:
            try:
                os.unlink(self._path(digest))
            except FileNotFoundError:
                pass

    def _pin(self, digest: Digest) -> None:
        self._pins[digest] = self._pins.get(digest, 0) + 1
        self._pin_sizes[digest] = self._index.get(digest, self._pin_sizes.get(digest, 0))

    def _unpin(self, digest: Digest) -> None:
        count = self._pins.pop(digest, 1) - 1
        if count > 0:
            self._pins[digest] = count
        else:
            self._pin_sizes.pop(digest, None)

    # -- last-use persistence ------------------------------------------------------

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
        touched, self._touched = self._touched, set()
        if touched:
            await asyncio.to_thread(self._utime_all, touched)

    def _utime_all(self, digests: set[Digest]) -> None:
        for digest in digests:
            try:
                os.utime(self._path(digest))
            except FileNotFoundError:
                pass

    # -- maintenance ---------------------------------------------------------------

    async def delete(self, digests: Sequence[Digest]) -> int:
        present = []
        for digest in digests:
            size = self._index.pop(digest, None)
            if size is not None:
                self._used -= size
                present.append(digest)
        if present:
            await asyncio.to_thread(self._unlink_all, present)
        return len(present)

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        now = time.time()
        for digest, size in list(self._index.items()):
            yield BlobInfo(digest, size, now)

    async def stats(self) -> dict[str, int]:
        return {
            "bytes": self._used,
            "objects": len(self._index),
            "quota_bytes": self.max_bytes,
            "evictions": self.evictions,
        }

    async def close(self) -> None:
        if self._touch_task is not None:
            self._touch_task.cancel()
            self._touch_task = None
        await self.flush_touches()


def _parse_key(name: str) -> Digest | None:
    parts = name.split("-")
    try:
        if len(parts) == 2:
            return Digest(parts[0], int(parts[1]), DigestFunction.SHA256)
        if len(parts) == 3:
            return Digest(parts[1], int(parts[2]), _FUNCTIONS[parts[0]])
    except (ValueError, KeyError):
        return None
    return None


def _discard(handle, tmp: str) -> None:
    if handle is not None:
        handle.close()
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _FileReader:
    """An async iterator over an open file that unpins the blob when done.

    A class rather than an async generator: an async generator that is never
    started never runs its `finally`, which would leak the file and the pin.
    """

    def __init__(self, storage: DiskStorage, digest: Digest, handle, remaining: int) -> None:
        self._storage = storage
        self._digest = digest
        self._handle = handle
        self._remaining = remaining

    def __aiter__(self) -> _FileReader:
        return self

    async def __anext__(self) -> bytes:
        if self._remaining <= 0 or self._handle is None:
            await self.aclose()
            raise StopAsyncIteration
        want = min(CHUNK_SIZE, self._remaining)
        chunk = await asyncio.to_thread(self._handle.read, want)
        if not chunk:
            await self.aclose()
            raise StopAsyncIteration
        self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._storage._unpin(self._digest)

    def __del__(self) -> None:
        self._release()


class DiskOptions(NodeOptions):
    path: str
    max_size: int | str = Field(default=0, alias="max-size")
    fsync: bool = False


@register("disk", DiskOptions)
def _build(options: DiskOptions, loader: object, path: str) -> DiskStorage:
    return DiskStorage(
        path=options.path, max_bytes=parse_size(options.max_size), fsync=options.fsync,
        verify=options.verify, name=path,
    )
