"""The engine's files: large blobs under `<path>/files/<2 hex>/<key>`, writes through `tmp/`.

A large blob is written to `tmp/`, hashed as it is written, and renamed into
`files/` only once verified, so no reader (and no restart after SIGKILL) sees a
partial blob; only then is its index entry committed.  A reader keeps its file
descriptor open, so eviction or a scrub (in this process or another) may unlink the
file under it: the reader finishes from the open file.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from casbah.digest import Digest
from casbah.storage.base import CHUNK_SIZE, Verifier
from casbah.storage.engine.check import new_hasher
from casbah.storage.engine.writeback import WriteBehind


class FileArea:
    """The `files/` and `tmp/` directories of one store."""

    def __init__(self, root: Path, durable: bool) -> None:
        self.root = root
        self.files = root / "files"
        self.tmp = root / "tmp"
        self.durable = durable
        #: Drop large files from the page cache as they are written (engine/writeback.py).
        self.write_behind = False
        self._counter = itertools.count()
        self.files.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: Digest) -> str:
        return f"{self.files}/{digest.hash[:2]}/{digest.key}"

    def new_tmp(self, digest: Digest, verifier: Verifier) -> TmpFile:
        return TmpFile(f"{self.tmp}/{digest.key}.{os.getpid()}.{next(self._counter)}", verifier, self.durable,
                       self.write_behind)

    def publish(self, tmp: TmpFile, final: str) -> None:
        """Rename a sealed temporary file into place (inside the indexing transaction)."""
        try:
            tmp.publish(final)
        except FileNotFoundError:  # the first blob of this prefix
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp.publish(final)

    def unlink_all(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def clear_tmp(self) -> int:
        """Remove leftovers of writes a killed process never finished (startup of a lone server)."""
        removed = 0
        for entry in os.scandir(self.tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
            removed += 1
        return removed


async def run_to_end(future: asyncio.Future) -> tuple[Any, bool]:
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


def pread_all(fd: int, offset: int, count: int) -> bytes:
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


class TmpFile:
    """A blob being written in tmp/: appended to and hashed in threads, then renamed.

    The lock orders the thread hops of one write, so `discard` (after a failure or a
    cancellation) runs after any append still in flight and nothing writes to the
    file after it has been closed and unlinked.
    """

    __slots__ = ("behind", "blocks", "check", "committed", "done", "fd", "fsync", "lock", "path", "started",
                 "verifier")

    def __init__(self, path: str, verifier: Verifier, fsync: bool, write_behind: bool = False) -> None:
        self.path = path
        self.verifier = verifier
        self.fsync = fsync
        self.fd = -1
        self.lock = threading.Lock()
        self.started = False  # set on the event loop before the first thread hop
        self.done = False
        self.committed = False
        self.blocks = 0
        self.check = new_hasher()  # the checksum reads verify against (check.py), in the same pass
        self.behind = WriteBehind() if write_behind else None

    def _write(self, chunks: list[bytes]) -> None:
        if self.done:
            raise RuntimeError(f"{self.path} was discarded")
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.verifier.update(data)
        self.check.update(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        if self.behind is not None:
            self.behind.wrote(self.fd, self.verifier.received)

    def append(self, chunks: list[bytes]) -> None:
        with self.lock:
            self._write(chunks)

    def seal(self, chunks: list[bytes]) -> int:
        """Write the tail, verify, close (outside the index's write lock: the slow part)."""
        with self.lock:
            self._write(chunks)
            self.verifier.finish()
            if self.fsync:
                os.fsync(self.fd)
            self.blocks = os.fstat(self.fd).st_blocks * 512
            os.close(self.fd)
            self.fd = -1
            return self.verifier.received

    def publish(self, final: str) -> None:
        """Make the sealed blob visible by an atomic rename: called inside the write
        transaction that indexes it, so no eviction's unlink (which runs inside its own
        transaction) can fall between the rename and the index entry."""
        with self.lock:
            os.replace(self.path, final)
            self.committed = self.done = True
            if self.fsync:
                _fsync_dir(os.path.dirname(final))

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



def read_chunk(fd: int, offset: int, count: int, verifier: Verifier) -> bytes:
    """One chunk of a file blob, hashed in the same thread hop that reads it."""
    data = pread_all(fd, offset, count)
    verifier.update(data)
    return data


class OpenFile:
    """A file descriptor closed once, by the stream or, if the stream is never
    started (an async generator never started never runs its `finally`), on collection."""

    __slots__ = ("fd", "on_close")

    def __init__(self, fd: int, on_close: Any) -> None:
        self.fd = fd
        self.on_close = on_close

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
            self.on_close()

    def __del__(self) -> None:
        self.close()


async def stream_file(handle: OpenFile, size: int, verifier: Verifier) -> AsyncIterator[bytes]:
    """Every chunk of an open file, hashed as read (one chunk read ahead, so disk and
    network overlap); `verified_range` holds the last one back until the hash matched."""
    loop = asyncio.get_running_loop()
    fd = handle.fd
    ahead = None
    try:
        offset = 0
        ahead = loop.run_in_executor(None, read_chunk, fd, 0, min(CHUNK_SIZE, size), verifier) if size else None
        while ahead is not None:
            chunk = await ahead
            offset += len(chunk)
            ahead = None
            if len(chunk) and offset < size:
                ahead = loop.run_in_executor(None, read_chunk, fd, offset, min(CHUNK_SIZE, size - offset), verifier)
            if chunk:
                yield chunk
    finally:
        if ahead is not None:
            await asyncio.wait((ahead,))  # a thread still reads the fd: close it after
        handle.close()
