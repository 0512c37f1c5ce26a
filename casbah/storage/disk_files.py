"""The file-level pieces of the `disk` backend: names, temporary files, streamed reads.

Kept apart from `disk.py` (the index, quota and ordering rules) because these run in
worker threads and know nothing of the index: a temporary file that is hashed as it
is written and renamed into place only once verified, and a reader that reads one
chunk ahead.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from casbah.digest import Digest, DigestFunction
from casbah.storage.base import CHUNK_SIZE, Verifier

if TYPE_CHECKING:
    from casbah.storage.disk import DiskStorage

_FUNCTIONS = {f.value: f for f in DigestFunction}
_HEX = frozenset("0123456789abcdef")


def _parse_key(name: str) -> Digest | None:
    parts = name.split("-")
    try:
        if len(parts) == 2:
            digest = Digest(parts[0], int(parts[1]), DigestFunction.SHA256)
        elif len(parts) == 3:
            digest = Digest(parts[1], int(parts[2]), _FUNCTIONS[parts[0]])
        else:
            return None
    except (ValueError, KeyError):
        return None
    if len(digest.hash) != 64 or not _HEX.issuperset(digest.hash) or digest.size < 0 or digest.key != name:
        return None
    return digest


async def _run_to_end(future: asyncio.Future) -> tuple[Any, bool]:
    """Await a thread hop that must not be abandoned half-way (a commit: once the
    rename is done the blob must be indexed).  Returns (result, whether the caller
    was cancelled meanwhile); the caller does its bookkeeping, then re-raises."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait((future,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled and future.exception() is not None:
        raise asyncio.CancelledError from future.exception()
    return future.result(), cancelled


def _pread_all(fd: int, offset: int, count: int) -> bytes:
    """`count` bytes at `offset`, fewer only at end of file."""
    data = os.pread(fd, count, offset)
    if len(data) == count or not data:
        return data
    parts = [data]
    got = len(data)
    while got < count:
        more = os.pread(fd, count - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class _TmpFile:
    """A blob being written in tmp/: appended to and hashed in threads, then renamed.

    The lock orders the thread hops of one write, so `discard` (after a failure or a
    cancellation) runs after any append still in flight and nothing writes to the
    file after it has been closed and unlinked.
    """

    __slots__ = ("committed", "done", "fd", "fsync", "lock", "path", "started", "verifier")

    def __init__(self, path: str, verifier: Verifier, fsync: bool) -> None:
        self.path = path
        self.verifier = verifier
        self.fsync = fsync
        self.fd = -1
        self.lock = threading.Lock()
        self.started = False  # set on the event loop before the first thread hop
        self.done = False
        self.committed = False

    def _write(self, chunks: list[bytes]) -> None:
        if self.done:
            raise RuntimeError(f"{self.path} was discarded")
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.verifier.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def append(self, chunks: list[bytes]) -> None:
        with self.lock:
            self._write(chunks)

    def commit(self, chunks: list[bytes], final: str) -> int:
        """Write the tail, verify, and make the blob visible by an atomic rename."""
        with self.lock:
            self._write(chunks)
            self.verifier.finish()
            # File times come from a coarse clock (blobs written within a few ms tie);
            # a precise mtime keeps the LRU order exact across a restart.
            now = time.time_ns()
            os.utime(self.fd, ns=(now, now))
            if self.fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.replace(self.path, final)
            self.committed = self.done = True
            if self.fsync:
                _fsync_dir(os.path.dirname(final))
            return self.verifier.received

    def discard(self) -> None:
        with self.lock:
            if self.committed:
                return
            self.done = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data


class _FileReader:
    """An async iterator over an open file that unpins the blob when done.

    A class rather than an async generator: an async generator that is never
    started never runs its `finally`, which would leak the file and the pin.

    It reads one chunk ahead: while the event loop hands chunk N to gRPC, a thread
    is already reading chunk N+1, so disk reads and network sends use both cores.
    """

    def __init__(self, storage: DiskStorage, digest: Digest, fd: int, offset: int, remaining: int) -> None:
        self._storage = storage
        self._digest = digest
        self._fd = fd
        self._offset = offset
        self._remaining = remaining
        self._ahead: asyncio.Future | None = None

    def __aiter__(self) -> _FileReader:
        return self

    def _read(self, want: int) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(None, _pread_all, self._fd, self._offset, want)

    async def __anext__(self) -> bytes:
        if self._remaining <= 0 or self._fd < 0:
            self._release()
            raise StopAsyncIteration
        want = min(CHUNK_SIZE, self._remaining)
        pending, self._ahead = self._ahead, None
        chunk = await (pending if pending is not None else self._read(want))
        if len(chunk) != want:
            self._release()
            if self._storage.verify:
                self._storage._lost(self._digest, True)
            if not chunk:  # without verification, a shorter entry replaced this one meanwhile
                raise StopAsyncIteration
        self._offset += want
        self._remaining -= want
        if self._remaining <= 0:
            self._release()
        else:
            self._ahead = self._read(min(CHUNK_SIZE, self._remaining))
        return chunk

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        ahead, self._ahead = self._ahead, None
        if ahead is not None and not ahead.done():
            # A thread is still reading this fd: close it only when that read is over,
            # or the number could be reused by another file under its feet.
            ahead.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._close(fd)))
        else:
            self._close(fd)

    def _close(self, fd: int) -> None:
        os.close(fd)
        self._storage._unpin(self._digest)

    def __del__(self) -> None:
        self._release()
