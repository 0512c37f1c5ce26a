"""The file-level pieces of the `disk` backend: names, the directory layout, temporary
files, streamed reads.

Kept apart from `disk.py` (which orders these against the index, `disk_index.py`)
because most of this runs in worker threads and knows nothing of the index: the
startup scan, batch reads and writes, unlinks; a temporary file that is hashed as it
is written and renamed into place only once verified; and a reader that reads one
chunk ahead.  Nothing here imports `disk.py`: the reader reports back through the
callbacks it is given.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from casbah.digest import Digest, DigestFunction
from casbah.storage.base import CHUNK_SIZE, Verifier

log = logging.getLogger(__name__)

_FUNCTIONS = {f.value: f for f in DigestFunction}
_HEX = frozenset("0123456789abcdef")


def parse_key(name: str) -> Digest | None:
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
    if (len(digest.hash) != digest.function.hex_length or not _HEX.issuperset(digest.hash) or digest.size < 0
            or digest.key != name):
        return None
    return digest


class ObjectFiles:
    """The directory of a disk store: `objects/<2 hex>/<key>` and `tmp/`.

    Every method but the path helpers blocks: call it in a thread (one hop per
    request, or per chunk of a large blob).  None of them touches the index; the
    caller decides what a missing or short file means.
    """

    def __init__(self, root: Path, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self._counter = itertools.count()

    def path(self, digest: Digest) -> str:
        return f"{self.objects}/{digest.hash[:2]}/{digest.key}"

    def tmp_path(self, digest: Digest) -> str:
        return f"{self.tmp}/{digest.key}.{os.getpid()}.{next(self._counter)}"

    def new_tmp(self, digest: Digest, verifier: Verifier) -> TmpFile:
        return TmpFile(self.tmp_path(digest), verifier, self.fsync)

    def scan(self, verify: bool, clear_tmp: bool) -> tuple[list[tuple[Digest, int]], int, int]:
        """Create the layout, empty tmp/ (if `clear_tmp`) and list the stored blobs,
        least recently modified first.

        Files that are not ours, or whose size is not the one their name says (a
        machine crash without fsync; casbah's own renames are atomic), are removed:
        never served.  Returns (blobs as (digest, size), tmp entries removed, bad
        files removed).
        """
        for prefix in range(256):
            (self.objects / f"{prefix:02x}").mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        orphans = 0
        for entry in os.scandir(self.tmp) if clear_tmp else ():
            _remove(entry)
            orphans += 1
        found: list[tuple[int, Digest, int]] = []
        dropped = 0
        for prefix in os.scandir(self.objects):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                digest = parse_key(entry.name)
                st = entry.stat(follow_symlinks=False)
                if (
                    digest is None
                    or not entry.is_file(follow_symlinks=False)
                    or digest.hash[:2] != prefix.name
                    or (verify and st.st_size != digest.size)
                ):
                    _remove(entry)
                    dropped += 1
                    continue
                found.append((st.st_mtime_ns, digest, st.st_size))
        found.sort(key=lambda item: item[0])
        return [(digest, size) for _, digest, size in found], orphans, dropped

    def size_of(self, digest: Digest) -> int | None:
        try:
            return os.stat(self.path(digest)).st_size
        except FileNotFoundError:
            return None

    def sizes_of(self, digests: list[Digest]) -> list[int | None]:
        path = self.path
        sizes: list[int | None] = []
        for digest in digests:
            try:
                sizes.append(os.stat(path(digest)).st_size)
            except FileNotFoundError:
                sizes.append(None)
        return sizes

    def exists(self, digest: Digest) -> bool:
        return os.path.exists(self.path(digest))

    def open(self, digest: Digest) -> int | None:
        try:
            return os.open(self.path(digest), os.O_RDONLY)
        except FileNotFoundError:
            return None

    def read_range(self, digest: Digest, offset: int, count: int) -> bytes | None:
        fd = self.open(digest)
        if fd is None:
            return None
        try:
            return pread_all(fd, offset, count)
        finally:
            os.close(fd)

    def read_batch(self, digests: list[Digest]) -> dict[Digest, bytes]:
        """Every file that exists, whole."""
        found = {}
        path = self.path
        for digest in digests:
            try:
                with open(path(digest), "rb", buffering=0) as f:
                    found[digest] = f.readall()
            except FileNotFoundError:
                continue
        return found

    def write_batch(
        self, victims: list[Digest], blobs: list[tuple[Digest, bytes]], verifier: Callable[[Digest], Verifier]
    ) -> list[Exception | None]:
        """One thread hop for a whole batch: remove the evicted files, then store each
        blob (verified, renamed into place).  Returns each blob's error, or None."""
        self.unlink_all(victims)
        errors: list[Exception | None] = []
        for digest, data in blobs:
            tmp = self.new_tmp(digest, verifier(digest))
            try:
                tmp.commit([data], self.path(digest))
                errors.append(None)
            except Exception as exc:
                tmp.discard()
                errors.append(exc)
        return errors

    def unlink_all(self, digests: list[Digest]) -> None:
        for digest in digests:
            try:
                os.unlink(self.path(digest))
            except FileNotFoundError:
                pass
            except OSError as exc:  # the index has forgotten it already: log, do not fail the caller
                log.warning("disk storage %s: cannot remove %s: %s", self.root, digest, exc)

    def utime_all(self, touched: dict[Digest, float]) -> None:
        """Set each file's mtime to its last use (what a restart orders by)."""
        for digest, when in touched.items():
            try:
                os.utime(self.path(digest), (when, when))
            except FileNotFoundError:
                pass


def _remove(entry: os.DirEntry) -> None:
    if entry.is_dir(follow_symlinks=False):
        shutil.rmtree(entry.path, ignore_errors=True)
    else:
        os.unlink(entry.path)


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


async def single_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class FileReader:
    """An async iterator over an open file that calls `on_close` (the reader's unpin)
    once, when done.

    A class rather than an async generator: an async generator that is never
    started never runs its `finally`, which would leak the file and the pin.

    It reads one chunk ahead: while the event loop hands chunk N to gRPC, a thread
    is already reading chunk N+1, so disk reads and network sends use both cores.

    A chunk shorter than expected means the file was truncated or replaced:
    `on_short` is called (after `on_close`) and may raise (a verified blob is then
    lost); else (or without `on_short`: an unverified entry replaced by a shorter
    one) the short chunk is the last one.
    """

    def __init__(self, fd: int, offset: int, remaining: int, *, on_close: Callable[[], None],
                 on_short: Callable[[], None] | None) -> None:
        self._fd = fd
        self._offset = offset
        self._remaining = remaining
        self._on_close = on_close
        self._on_short = on_short
        self._ahead: asyncio.Future | None = None

    def __aiter__(self) -> FileReader:
        return self

    def _read(self, want: int) -> asyncio.Future:
        return asyncio.get_running_loop().run_in_executor(None, pread_all, self._fd, self._offset, want)

    async def __anext__(self) -> bytes:
        if self._remaining <= 0 or self._fd < 0:
            self._release()
            raise StopAsyncIteration
        want = min(CHUNK_SIZE, self._remaining)
        pending, self._ahead = self._ahead, None
        chunk = await (pending if pending is not None else self._read(want))
        if len(chunk) != want:
            self._release()
            if self._on_short is not None:
                self._on_short()
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
        self._on_close()

    def __del__(self) -> None:
        self._release()
