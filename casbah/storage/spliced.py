"""Blobs stored as their chunk lists (SpliceBlob / SplitBlob), over any backend.

A spliced blob is not copied: its chunks are ordinary CAS blobs (so similar large
blobs share storage and the quota counts each chunk once) and a small *split
record* (blob digest -> chunking function, FastCDC parameters, ordered chunk
digests) goes to a `verify: false` storage node, the way the ActionCache keeps its
entries.  This decorator sits between every service and an instance's CAS node, so
whatever the backend (disk, memory, S3, remote, the new engine…):

- `find_missing` reports a blob present while it is stored whole OR every chunk of
  its record is present (one extra FindMissing over the chunks, which also refreshes
  their lifetime): an evicted or scrubbed chunk makes the blob missing at once;
- `read` of a blob stored only as chunks streams it chunk by chunk, verifying the
  whole digest as it passes (a record that lies is DATA_LOSS, never served);
- `read_many` (BatchReadBlobs, GetTree of a spliced Directory) assembles small ones;
- a whole read of a large blob the backend would fetch from an upstream that splits
  (an edge: `cache` of a local store in front of a `remote`; the backend answers
  `upstream_chunks`) goes by the upstream's chunk list instead: each chunk is read
  through the backend, so those the local side holds are served locally and only the
  others cross the network (and are kept, so the next version shares them); the
  whole is verified as it streams, and the split is recorded here only once it did,
  so later reads are assembled from local chunks, without the upstream.

The REAPI calls themselves (`splice`, `split`) are in `casbah/storage/splitting.py`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from casbah.digest import Digest, DigestFunction
from casbah.digest_batch import larger_than, without
from casbah.errors import BlobNotFound, CasbahError, DataLoss
from casbah.storage.base import BlobInfo, ReadVerifier, Storage, check_range, found_or_lost, verified_range

#: Values of build.bazel.remote.execution.v2.ChunkingFunction.Value.
CHUNKING_UNKNOWN, FAST_CDC_2020, REP_MAX_CDC = 0, 1, 2
#: Whole reads of blobs above this size look for a split record (or an upstream's split)
#: first, so a blob kept as chunks is served from them; smaller ones (rarely chunked: at
#: the default parameters clients chunk from 4 MiB) read the backend first and spare the
#: index lookup on the hot path, as before.
ASSEMBLE_FIRST = 1 << 20
#: Split records are kept only for blobs larger than this; a smaller spliced blob is
#: assembled and stored whole (it costs at most this much to store, and a split of one
#: is recomputed on demand).  So FindMissingBlobs asks the split index only about absent
#: digests this large: most digests it sees are small, and looking each of them up in a
#: second index cost as much again as the first lookup.  (Records an older casbah kept
#: for smaller blobs still serve reads; FindMissingBlobs reports those blobs missing, and
#: the client's re-upload stores them whole.)
RECORD_MIN = 64 << 10


@dataclass(frozen=True, slots=True)
class SplitRecord:
    """How a blob is composed.  `avg`/`seed` are the FastCDC parameters a server split
    used (0 when a client spliced with a chunking it did not name)."""

    chunking: int
    chunks: tuple[Digest, ...]
    avg: int = 0
    seed: int = 0

    def encode(self) -> bytes:
        return json.dumps({"v": 1, "chunking": self.chunking, "avg": self.avg, "seed": self.seed,
                           "chunks": [[d.hash, d.size] for d in self.chunks]}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, function: DigestFunction) -> SplitRecord:
        doc = json.loads(data)
        return cls(int(doc["chunking"]), tuple(Digest(h, int(s), function) for h, s in doc["chunks"]),
                   int(doc.get("avg", 0)), int(doc.get("seed", 0)))


class SplicedStorage(Storage):
    """`inner` (the instance's CAS) plus `index` (split records, `verify: false`)."""

    kind = "spliced"

    def __init__(self, inner: Storage, index: Storage) -> None:
        if index.verify:
            raise ValueError(f"storage {index.name!r} verifies hashes; a split index needs 'verify: false'")
        super().__init__(name=inner.name, verify=inner.verify)
        self.inner = inner
        self.index = index

    # -- split records ---------------------------------------------------------------

    async def record(self, digest: Digest) -> SplitRecord | None:
        try:
            data = await self.index.read_bytes(digest)
        except BlobNotFound:
            return None
        return SplitRecord.decode(data, digest.function)

    async def records(self, digests: Sequence[Digest]) -> dict[Digest, SplitRecord]:
        """Records of those `digests` that have one (a cheap existence check first:
        most blobs FindMissingBlobs reports absent have none)."""
        if not digests:
            return {}
        absent = await self.index.find_missing(digests)
        if len(absent) == len(digests):  # the usual answer, and no Digest built for it (a DigestArray)
            return {}
        gone = set(absent)
        known = [d for d in digests if d not in gone]
        found = await self.index.read_many(known)
        return {d: SplitRecord.decode(data, d.function) for d, data in found.items()}

    async def put_record(self, digest: Digest, record: SplitRecord) -> None:
        await self.index.write_bytes(digest, record.encode())

    async def complete(self, digests: Sequence[Digest]) -> tuple[dict[Digest, SplitRecord], set[Digest]]:
        """(records of `digests`, the digests among them whose every chunk is present)."""
        records = await self.records(digests)
        if not records:
            return records, set()
        chunks = list(dict.fromkeys(c for r in records.values() for c in r.chunks))
        gone = set(await self.inner.find_missing(chunks))
        return records, {d for d, r in records.items() if not gone.intersection(r.chunks)}

    # -- the storage interface -------------------------------------------------------

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        missing = await self.inner.find_missing(digests)
        large = larger_than(missing, RECORD_MIN)
        if not large:
            return missing
        _, assembled = await self.complete(large)
        return without(missing, assembled)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        if not offset and not limit and digest.size > ASSEMBLE_FIRST:
            assembled = await self._read_by_chunks(digest)
            if assembled is not None:
                return assembled
        try:
            return await self.inner.read(digest, offset, limit)
        except BlobNotFound:
            record = await self.record(digest)
            if record is None:
                raise
        gone = await self.inner.find_missing(record.chunks)
        if gone:
            raise BlobNotFound(digest, f"chunk {gone[0]} of the spliced blob is missing")
        count = check_range(digest, digest.size, offset, limit)
        verifier = ReadVerifier(digest, f"{self.describe()} (assembled from {len(record.chunks)} chunks)")
        return verified_range(self._concatenation(digest, record.chunks), verifier, offset, count)

    async def _read_by_chunks(self, digest: Digest) -> AsyncIterator[bytes] | None:
        """A large blob from its chunks when it has a complete record, or when the backend
        would otherwise fetch it whole from an upstream that can split it; None: read it
        as before (whole from the backend)."""
        record = await self.record(digest)
        if record is not None:
            if await self.inner.find_missing(record.chunks):
                return None  # a chunk is gone; the blob may still be stored whole
            verifier = ReadVerifier(digest, f"{self.describe()} (assembled from {len(record.chunks)} chunks)")
            return verified_range(self._concatenation(digest, record.chunks), verifier, 0, digest.size)
        chunks = await self.inner.upstream_chunks(digest)
        if chunks is None:
            return None
        return self._fetched(digest, chunks)

    async def _fetched(self, digest: Digest, chunks: list[Digest]) -> AsyncIterator[bytes]:
        """The upstream's chunks in order, verified against the blob, the split recorded
        before the last piece is passed on (a lying chunk list or chunk is DATA_LOSS, and
        nothing is recorded)."""
        verifier = ReadVerifier(digest, f"{self.describe()} (the upstream's {len(chunks)} chunks)")
        held: bytes | None = None
        async for piece in self._concatenation(digest, chunks):
            verifier.update(piece)
            if held is not None:
                yield held
            held = piece
        verifier.finish()
        await self.put_record(digest, SplitRecord(FAST_CDC_2020, tuple(chunks)))
        if held is not None:
            yield held

    async def _concatenation(self, digest: Digest, chunks: Sequence[Digest]) -> AsyncIterator[bytes]:
        """The chunks' bytes in order, one chunk open at a time."""
        for chunk in chunks:
            try:
                stream = await self.inner.read(chunk)
            except BlobNotFound:
                raise DataLoss(f"chunk {chunk} of spliced blob {digest} vanished while it was read") from None
            async for piece in stream:
                yield piece

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        try:
            found = await self.inner.read_many(digests)
            lost: dict[Digest, CasbahError] = {}
        except DataLoss as exc:
            found, lost = getattr(exc, "found", {}), getattr(exc, "lost", {})
            if not lost:
                raise
        absent = [d for d in digests if d not in found and d not in lost]
        _, assembled = await self.complete(absent)
        for digest in absent:
            if digest in assembled:
                try:
                    stream = await self.read(digest)
                    found[digest] = b"".join([piece async for piece in stream])
                except BlobNotFound:
                    pass
                except DataLoss as exc:
                    lost[digest] = exc
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self.inner.write(digest, chunks)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        await self.inner.write_bytes(digest, data)

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        return await self.inner.write_many(blobs)

    async def delete(self, digests: Sequence[Digest]) -> int:
        records = await self.records(digests)
        if records:
            await self.index.delete(list(records))
        return await self.inner.delete(digests)

    def iterate(self) -> AsyncIterator[BlobInfo]:
        """The stored blobs, chunks among them; a spliced blob is no stored object of its own."""
        return self.inner.iterate()

    async def stats(self) -> dict[str, int]:
        return await self.inner.stats()

    async def close(self) -> None:
        await self.inner.close()
        await self.index.close()

    def children(self) -> Iterable[Storage]:
        return (self.inner,)

    @property
    def node_label(self) -> str:
        return self.inner.node_label

    def describe(self) -> str:
        return self.inner.describe()

    def __getattr__(self, name: str):
        if name == "inner":
            raise AttributeError(name)
        # Backend-specific extras (a disk node's find_by_hash, a quota's max_bytes) pass through.
        return getattr(self.inner, name)
