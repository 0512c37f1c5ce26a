"""FastCDC 2020 content-defined chunking, as the REAPI fixes it.

The REAPI's `FAST_CDC_2020` is FastCDC with normalization level 2, min = avg/4 and
max = avg*4, a seed that alternates the gear table, and 512 KiB as the recommended
average.  `pyfastcdc` implements exactly that (it reproduces the REAPI's published
test vectors, see tests/data/), in C, over a buffer: callers hand it an mmap of a
file so a 256 MiB blob is paged in by the kernel, never copied into Python memory.

Both sides use this module: the server splitting a blob that was uploaded whole
(`SplitBlob`) and the client chunking a file before a `SpliceBlob` upload, so the
two cut at the same places and share chunks.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pyfastcdc

from casbah.digest import Digest, DigestFunction

#: The REAPI's recommended average chunk size.
DEFAULT_AVG = 512 * 1024
#: The range the REAPI allows for `avg_chunk_size_bytes`.
MIN_AVG, MAX_AVG = 1024, 1024 * 1024


@dataclass(frozen=True, slots=True)
class FastCdcParams:
    """What a server advertises in `fast_cdc_2020_params`; min and max follow from avg."""

    avg: int = DEFAULT_AVG
    seed: int = 0

    def __post_init__(self) -> None:
        if not MIN_AVG <= self.avg <= MAX_AVG or self.avg & (self.avg - 1):
            raise ValueError(f"FastCDC average chunk size {self.avg} must be a power of 2 from 1 KiB to 1 MiB")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"FastCDC seed {self.seed} must fit in 32 bits unsigned (uint32 on the wire)")

    @property
    def min(self) -> int:
        return self.avg // 4

    @property
    def max(self) -> int:
        return self.avg * 4

    def chunker(self) -> pyfastcdc.FastCDC:
        return pyfastcdc.FastCDC(self.avg, min_size=self.min, max_size=self.max, normalized_chunking=2,
                                 seed=self.seed)


@dataclass(frozen=True, slots=True)
class Cut:
    """One chunk of a blob: where it lies and its digest."""

    offset: int
    digest: Digest


def cut_buffer(buf: memoryview | bytes, params: FastCdcParams, function: DigestFunction) -> list[Cut]:
    """Chunk a buffer and hash each chunk (blocking: run it in a thread; the hashes
    release the GIL on large inputs)."""
    cuts: list[Cut] = []
    for chunk in params.chunker().cut_buf(buf):
        hasher = function.hasher(chunk.length)
        hasher.update(chunk.data)
        cuts.append(Cut(chunk.offset, Digest(hasher.hexdigest(), chunk.length, function)))
    return cuts


#: Bytes of a file mapped at once while it is chunked.
WINDOW = 64 << 20


def cut_fd(fd: int, params: FastCdcParams, function: DigestFunction, window: int = WINDOW) -> list[Cut]:
    """Chunk an open file (blocking) through a sliding mmap of at most `window` bytes:
    the same cuts as `cut_buffer` over the whole file (FastCDC starts afresh at every
    cut, so a window that starts at a cut and drops its last, possibly truncated, chunk
    cuts exactly where the whole would), while a 1 GiB file never becomes 1 GiB of
    the process's resident memory (mapped pages count there until unmapped)."""
    size = os.fstat(fd).st_size
    window = max(window, 2 * params.max + mmap.ALLOCATIONGRANULARITY)
    cuts: list[Cut] = []
    position = 0
    while position < size:
        base = position - position % mmap.ALLOCATIONGRANULARITY
        length = min(size - base, window)
        final = base + length >= size
        mapped = mmap.mmap(fd, length, offset=base, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            part = cut_buffer(view[position - base:], params, function)
        finally:
            try:
                view.release()
                mapped.close()
            except BufferError:
                pass  # a chunk view still refers to it: the mapping goes with the last reference
        if not final:
            part = part[:-1]  # the window's end is no cut: that chunk is cut again from its start
        cuts.extend(Cut(position + c.offset, c.digest) for c in part)
        position = cuts[-1].offset + cuts[-1].digest.size
    return cuts


def cut_file(path: str | os.PathLike, params: FastCdcParams, function: DigestFunction) -> list[Cut]:
    """Chunk a file (blocking), through a sliding mmap window."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return cut_fd(fd, params, function)
    finally:
        os.close(fd)


def read_at(fd: int, offset: int, size: int) -> bytes:
    """`size` bytes of an open file from `offset` (blocking; a chunk's bytes to send)."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise EOFError(f"the file ends {size - len(data)} bytes short of a chunk at offset {offset}")
        data += more
    return data


def spans(cuts: list[Cut]) -> Iterator[tuple[int, int, Digest]]:
    """(offset, length, digest) of each chunk."""
    for cut in cuts:
        yield cut.offset, cut.digest.size, cut.digest
