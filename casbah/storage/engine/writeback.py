"""Write-behind for large files (the `disk` kind's `write-behind` option, off by default):
start writeback as a file grows, then drop its written pages from the page cache.

Left to itself, the kernel keeps every byte of an upload in the page cache until
memory pressure evicts it.  That is what a cache wants when blobs are read back soon,
but it costs the writer dearly where a VM hands its free memory back to the host
(virtio-balloon free page reporting, as on the bench machine): every page the page
cache grows by is faulted in from the host on its first touch, the write's copy.
Measured there: 0.2 ms of system time per MiB written while the kernel recycles pages
freed a moment ago, 6-7 ms/MiB once it takes memory that has been free for a few
seconds; with write-behind a writer stays on a few recycled MiB (~1.8-2.0 ms/MiB of
server CPU in all).  The price: the first read of a dropped blob comes from the disk and
grows the page cache itself (there, 2.7-3.0 instead of 1.4 ms/MiB of server CPU, and
half the throughput).  Hence off by default (bench/RESULTS.md, issue 13).

Every `WINDOW` of new data starts the writeback of that window (`sync_file_range`,
asynchronous); once a file is past three windows, each start also drops what was
written before the previous one, written out by then (`POSIX_FADV_DONTNEED` drops
clean pages only: one still dirty stays cached until the next window's drop).  A file
shorter than three windows stays cached whole: small and medium blobs are the ones
most often read back soon.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Callable

#: Bytes between two writeback starts, and how far the dropping lags behind the writing.
WINDOW = 8 * 1024 * 1024

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE), which Python's os module lacks;
    None elsewhere (then POSIX_FADV_DONTNEED, which starts writeback too, does both)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def start(fd: int, offset: int, count: int) -> None:
        fn(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure costs only the caching

    return start


_start_writeback = _sync_file_range()
_fadvise = getattr(os, "posix_fadvise", None)


class WriteBehind:
    """The write-behind state of one file being appended to (not thread-safe: the
    caller's lock orders the appends)."""

    __slots__ = ("kicked",)

    def __init__(self) -> None:
        self.kicked = 0  # writeback started for bytes before this offset

    def wrote(self, fd: int, end: int) -> None:
        """The file now holds `end` bytes."""
        if end - self.kicked < WINDOW or _fadvise is None:
            return
        if _start_writeback is not None:
            _start_writeback(fd, self.kicked, end - self.kicked)
        if self.kicked >= 2 * WINDOW:
            # Up to the window before the one just started, whose writeback had a window's
            # time; from the start, so pages still under writeback last time go now (a
            # range already dropped costs a lookup that finds nothing).
            try:
                _fadvise(fd, 0, self.kicked, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
        self.kicked = end
