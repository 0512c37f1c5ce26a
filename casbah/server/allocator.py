"""The C allocator's settings for a server: reuse freed MiB-sized buffers instead of
handing them back to the kernel and faulting them in again.

Every 1 MiB ByteStream message becomes a 1 MiB `bytes` (the message parse), and every
1 MiB storage read another.  glibc serves such blocks with mmap, or from a heap it
trims as soon as its top is free, so each message costs 256 fresh page faults and the
kernel zeroing those pages: ~200 minor faults and 0.1-0.3 ms of system time per MiB
written (measured: bench/RESULTS.md, issue 13).  With a higher mmap threshold and a
trim threshold above the blocks in flight, freed blocks are reused as they are (2-15
faults per MiB).  What this keeps from the kernel is bounded by `TRIM_THRESHOLD` per
arena of free memory at the top of a heap: after 1 GiB of uploads and reads, idle
RssAnon 107-123 MB against 77-88 with glibc's defaults (32 MiB kept 94-169 MB).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

#: Blocks below this come from the heap (glibc's default starts at 128 KiB).
MMAP_THRESHOLD = 8 * 1024 * 1024
#: Free memory at the top of a heap kept for reuse rather than returned to the kernel.
TRIM_THRESHOLD = 16 * 1024 * 1024

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Apply the settings where the C library is glibc; returns whether it did."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has mallopt's meaning here
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not done:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return done
