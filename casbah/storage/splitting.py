"""SpliceBlob and SplitBlob over a `SplicedStorage` (the decorator every instance's CAS has).

Both answer with the REAPI's statuses through `casbah.errors`:

- splice: a missing chunk is NOT_FOUND naming it; chunks whose concatenation does not
  hash to the blob's digest are INVALID_ARGUMENT and nothing is recorded; a blob the
  server already keeps as a different, complete chunk list is ALREADY_EXISTS (the blob
  is present: a client takes it as done).  Otherwise the record is written and the
  blob is present, stored as its chunks, never copied — unless it is no larger than
  `RECORD_MIN` (64 KiB): such a blob is assembled and stored whole, without a record.
- split: a spliced blob answers its recorded list while every chunk is present; on an
  edge lacking the blob, the upstream's list (not fetching the blob whole); a blob
  stored whole is cut with FastCDC 2020 at the instance's parameters, every chunk made
  present in CAS, the split recorded and answered; a blob no larger than the minimum
  chunk size is its own single chunk (what FastCDC yields), answered without a record;
  a blob of at most `RECORD_MIN` is answered its cut but kept whole and not recorded;
  an absent blob, or a spliced one that lost a chunk and is not stored whole, is NOT_FOUND.

A split spools the blob to a temporary file and chunks it through a sliding mmap window
in a thread, so a 256 MiB blob is never in memory; chunks go back to storage a group at
a time.  Once the split is recorded, the whole copy is deleted: reads assemble the blob
from its chunks (verified), so a blob uploaded whole and then split is not stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from casbah.cdc import Cut, FastCdcParams, cut_fd, read_at
from casbah.digest import Digest, is_empty_blob
from casbah.errors import AlreadyExists, BlobNotFound, CasbahError, DigestMismatch, InvalidArgument
from casbah.storage.base import Verifier
from casbah.storage.spliced import CHUNKING_UNKNOWN, FAST_CDC_2020, RECORD_MIN, SplicedStorage, SplitRecord
from casbah.streams import write_all

log = logging.getLogger(__name__)

#: Chunk bytes written back to storage per write_many call during a split.
WRITE_GROUP = 8 << 20


async def splice(store: SplicedStorage, blob: Digest, chunks: Sequence[Digest], chunking: int) -> None:
    total = sum(c.size for c in chunks)
    if total != blob.size:
        raise InvalidArgument(f"the {len(chunks)} chunks total {total} bytes, not the {blob.size} of blob {blob}")
    record = SplitRecord(chunking, tuple(chunks))
    existing = await store.record(blob)
    if existing is not None and existing.chunks != record.chunks:
        _, complete = await store.complete([blob])
        if blob in complete:
            raise AlreadyExists(f"blob {blob} is already stored as another chunk list "
                                f"({len(existing.chunks)} chunks, chunking function {existing.chunking})")
    stored = [c for c in chunks if not is_empty_blob(c)]
    gone = await store.inner.find_missing(list(dict.fromkeys(stored)))
    if gone:
        raise BlobNotFound(gone[0], f"chunk {gone[0]} of the splice of {blob} is missing "
                                    f"({len(gone)} chunk(s) missing)")
    if existing is not None and existing.chunks == record.chunks:
        return  # verified when it was recorded
    verifier = Verifier(blob)
    whole: list[bytes] | None = [] if blob.size <= RECORD_MIN else None
    try:
        for chunk in stored:
            async for piece in await store.inner.read(chunk):
                verifier.update(piece)
                if whole is not None:
                    whole.append(piece)
        verifier.finish()
    except DigestMismatch as exc:
        raise InvalidArgument(f"the concatenation of the {len(chunks)} chunks is not blob {blob}: {exc}") from None
    except BlobNotFound as exc:
        raise BlobNotFound(blob, f"a chunk of the splice vanished while it was verified: {exc}") from None
    if whole is not None:  # small: stored whole, no record (spliced.RECORD_MIN says why)
        await store.inner.write_bytes(blob, b"".join(whole))
        return
    await _forward(store, blob, stored)
    await store.put_record(blob, record)


async def _forward(store: SplicedStorage, blob: Digest, chunks: list[Digest]) -> None:
    """On an edge (a backend that writes to an upstream), the upstream gets the blob too:
    SpliceBlob there (its chunks went up as they were written), or, for an upstream that
    cannot splice, the blob streamed whole from the chunks.  Before the local record, so
    a splice the upstream refuses fails here too (the upstream is the truth for writes)."""
    if await store.inner.splice_upstream(blob, chunks) is not False:
        return

    async def concatenation() -> AsyncIterator[bytes]:
        for chunk in chunks:
            async for piece in await store.inner.read(chunk):
                yield piece

    await store.inner.write(blob, concatenation())


async def split(store: SplicedStorage, blob: Digest, params: FastCdcParams,
                spool_dir: Path | None = None) -> tuple[list[Digest], int]:
    """(chunk digests, chunking function) for SplitBlob."""
    if blob.size == 0:
        return [], FAST_CDC_2020
    records, complete = await store.complete([blob])
    record = records.get(blob)
    whole = not await store.inner.find_missing([blob])
    if record is not None and blob in complete and not (whole and _other_params(record, params)):
        return list(record.chunks), record.chunking
    if record is None:
        upstream = await store.inner.upstream_chunks(blob)  # an edge lacking the blob: the upstream's split
        if upstream is not None:
            return upstream, FAST_CDC_2020  # recorded once a read through the edge verified it
    if not whole:
        if record is not None:
            gone = await store.inner.find_missing(list(record.chunks))
            raise BlobNotFound(blob, f"chunk {gone[0] if gone else '?'} of the split is gone and the blob "
                                     "is not stored whole")
        raise BlobNotFound(blob)
    if blob.size <= params.min:
        return [blob], FAST_CDC_2020  # FastCDC yields the blob itself; nothing to record
    cuts = await _split_whole(store, blob, params, spool_dir)
    chunks = [c.digest for c in cuts]
    if blob.size <= RECORD_MIN:
        return chunks, FAST_CDC_2020  # kept whole, not recorded (spliced.RECORD_MIN): cut again when asked
    await store.put_record(blob, SplitRecord(FAST_CDC_2020, tuple(chunks), params.avg, params.seed))
    await _drop_whole(store, blob)
    return chunks, FAST_CDC_2020


async def _drop_whole(store: SplicedStorage, blob: Digest) -> None:
    """The chunks and the record now make the blob present; the whole copy would only
    double its storage until evicted.  A backend that cannot delete (a plain `remote`)
    keeps it."""
    try:
        await store.inner.delete([blob])
    except CasbahError as exc:
        log.debug("split of %s: the whole copy stays (%s)", blob, exc)


def _other_params(record: SplitRecord, params: FastCdcParams) -> bool:
    """A server split at other FastCDC parameters (another instance sharing the index):
    re-split a blob stored whole, so the answer matches what this instance advertises."""
    return record.chunking == FAST_CDC_2020 and bool(record.avg) and (record.avg, record.seed) != (params.avg,
                                                                                                   params.seed)


async def _split_whole(store: SplicedStorage, blob: Digest, params: FastCdcParams,
                       spool_dir: Path | None) -> list[Cut]:
    if spool_dir is not None:
        await asyncio.to_thread(spool_dir.mkdir, parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=spool_dir) as spool:
        fd = spool.fileno()
        async for piece in await store.inner.read(blob):
            await asyncio.to_thread(write_all, fd, piece)
        if os.fstat(fd).st_size != blob.size:
            raise BlobNotFound(blob, "the stored blob changed while it was split")
        cuts = await asyncio.to_thread(cut_fd, fd, params, blob.function)
        gone = set(await store.inner.find_missing([c.digest for c in cuts]))
        group: list[tuple[Digest, bytes]] = []
        held = 0
        for cut in cuts:
            if cut.digest not in gone:
                continue
            gone.discard(cut.digest)  # a chunk twice in a blob is written once
            group.append((cut.digest, await asyncio.to_thread(read_at, fd, cut.offset, cut.digest.size)))
            held += cut.digest.size
            if held >= WRITE_GROUP:
                await _write_group(store, group)
                group, held = [], 0
        if group:
            await _write_group(store, group)
        return cuts


async def _write_group(store: SplicedStorage, group: list[tuple[Digest, bytes]]) -> None:
    for error in await store.inner.write_many(group):
        if error is not None:
            raise error


__all__ = ["CHUNKING_UNKNOWN", "FAST_CDC_2020", "splice", "split"]
