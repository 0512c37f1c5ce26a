"""Write-behind of large files (`casbah/storage/engine/writeback.py`, the `disk` kind's
`write-behind` option): a large upload leaves the page cache as it is written, and
still stores every byte; without the option, everything written stays cached.

Page residency is read with mincore(2) on a private mapping of the file, on a real
file in the test's directory; where the filesystem ignores POSIX_FADV_DONTNEED
(tmpfs keeps its pages: they are the file), the residency test is skipped.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from casbah.digest import Digest
from casbah.storage.disk import DiskStorage
from casbah.storage.engine import writeback
from casbah.storage.engine.files import TmpFile
from casbah.streams import Verifier

MiB = 1 << 20
PAGE = mmap.PAGESIZE


def resident(path: Path) -> list[bool]:
    """Per page of the file: whether it is in the page cache."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    size = path.stat().st_size
    pages = (size + PAGE - 1) // PAGE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # never written: reports the page cache
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            vec = (ctypes.c_ubyte * pages)()
            rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
            del anchor
            if rc != 0:
                pytest.skip(f"mincore failed: {os.strerror(ctypes.get_errno())}")
            return [bool(v & 1) for v in vec]
        finally:
            mm.close()


def drops_pages(directory: Path) -> bool:
    """Whether this filesystem drops clean pages on POSIX_FADV_DONTNEED."""
    probe = directory / "probe"
    probe.write_bytes(os.urandom(16 * PAGE))
    with open(probe, "rb+") as f:
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    dropped = not any(resident(probe))
    probe.unlink()
    return dropped


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_written_windows_leave_the_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before write-behind every byte of an upload stayed cached; now all but the last
    windows are dropped once written out (an fdatasync stands for the writeback's time)."""
    if not drops_pages(tmp_path):
        pytest.skip("this filesystem keeps clean pages on POSIX_FADV_DONTNEED")
    monkeypatch.setattr(writeback, "WINDOW", MiB)
    data = os.urandom(3 * MiB)
    path = tmp_path / "upload"
    tmp = TmpFile(str(path), Verifier(Digest.of(data)), fsync=False, write_behind=True)
    tmp.append([data[: 2 * MiB]])
    os.fdatasync(tmp.fd)  # the first two windows are clean now
    tmp.append([data[2 * MiB :]])
    tmp.seal([])
    pages = resident(path)
    first, last = pages[: 2 * MiB // PAGE], pages[2 * MiB // PAGE :]
    assert not any(first), f"{sum(first)} of {len(first)} written-out pages still cached"
    assert all(last), "the newest window (not yet written out) must stay cached"
    assert path.read_bytes() == data


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_off_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the option the written pages stay: a read of a fresh blob finds them cached."""
    if not drops_pages(tmp_path):
        pytest.skip("this filesystem keeps clean pages on POSIX_FADV_DONTNEED")
    monkeypatch.setattr(writeback, "WINDOW", MiB)
    data = os.urandom(4 * MiB)
    path = tmp_path / "upload"
    tmp = TmpFile(str(path), Verifier(Digest.of(data)), fsync=False)
    tmp.append([data[: 2 * MiB]])
    os.fdatasync(tmp.fd)
    tmp.append([data[2 * MiB :]])
    tmp.seal([])
    assert all(resident(path))


def test_small_files_stay_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file shorter than three windows is never dropped: small blobs are the ones read back."""
    monkeypatch.setattr(writeback, "WINDOW", MiB)
    data = os.urandom(3 * MiB - 1)
    path = tmp_path / "small"
    tmp = TmpFile(str(path), Verifier(Digest.of(data)), fsync=False, write_behind=True)
    for pos in range(0, len(data), MiB // 2):
        tmp.append([data[pos : pos + MiB // 2]])
        os.fdatasync(tmp.fd)
    tmp.seal([])
    assert all(resident(path))


def test_large_streamed_write_is_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the disk storage, a blob many windows long reads back byte for byte."""
    monkeypatch.setattr(writeback, "WINDOW", MiB)
    data = os.urandom(9 * MiB + 123)
    digest = Digest.of(data)

    async def chunks() -> AsyncIterator[bytes]:
        for pos in range(0, len(data), 300 * 1024):
            yield data[pos : pos + 300 * 1024]

    async def main() -> None:
        storage = DiskStorage(path=tmp_path / "store", write_behind=True)
        try:
            await storage.write(digest, chunks())
            assert await storage.read_bytes(digest) == data
        finally:
            await storage.close()

    asyncio.run(main())
