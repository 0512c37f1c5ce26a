"""The storage interface every backend and decorator implements.

Five abstract operations, all async (the server is grpc.aio) and all streaming:

- `find_missing(digests)`: the bulk existence check behind FindMissingBlobs; it
  also refreshes the lifetime of the blobs it finds (REAPI asks for that).
- `read(digest, offset, limit)`: awaiting it raises `BlobNotFound` before any data
  is produced, so a service can still answer NOT_FOUND; the result is an async
  iterator of chunks, so no blob is ever held whole in memory.
- `write(digest, chunks)`: consumes an async stream; the blob becomes visible only
  after its hash and size have been verified (`DigestMismatch` otherwise, and
  nothing is stored).
- `delete(digests)` and `iterate()`: for GC, scrubbing and stats.

Everything else (`has`, bytes helpers, batch helpers) has a default built on those
five, which a backend overrides when it can do better (one thread hop for a whole
batch on disk, one pipeline on Redis, one RPC on a remote).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss, InvalidArgument, OutOfRange
from casbah.streams import (  # re-exported: the backends' names for them
    CHUNK_SIZE,
    NoVerifier,
    ReadVerifier,
    Verifier,
    empty_stream,
    one_chunk,
    verified_range,
)

__all__ = ["CHUNK_SIZE", "BlobInfo", "BlobsLost", "ReadVerifier", "Storage", "Verifier", "check_range",
           "empty_stream", "found_or_lost", "one_chunk", "read_many_partial", "read_one", "verified_range"]



@dataclass(frozen=True, slots=True)
class BlobInfo:
    """What `iterate()` yields: enough for GC and stats without reading data."""

    digest: Digest
    stored_size: int
    last_access: float


class Storage(abc.ABC):
    """A blob store.  Subclasses set `kind` (the config name)."""

    kind: str = "abstract"

    def __init__(self, *, name: str = "", verify: bool = True) -> None:
        #: Node name in the config graph, for logs and metrics.
        self.name = name or self.kind
        #: False only for key-value use (ActionCache entries are keyed by the
        #: action digest, not by the hash of the stored bytes).
        self.verify = verify

    # -- the abstract operations ---------------------------------------------------

    @abc.abstractmethod
    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        """Digests from `digests` that are absent, in input order."""

    @abc.abstractmethod
    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        """Open a blob.  Raises BlobNotFound (or OutOfRange) before returning."""

    @abc.abstractmethod
    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Store a blob from a stream, verified before it becomes visible."""

    @abc.abstractmethod
    async def delete(self, digests: Sequence[Digest]) -> int:
        """Remove blobs; returns how many were present."""

    @abc.abstractmethod
    def iterate(self) -> AsyncIterator[BlobInfo]:
        """Every stored blob, in no particular order."""

    # -- defaults a backend may override -------------------------------------------

    async def has(self, digest: Digest) -> bool:
        return not await self.find_missing([digest])

    async def read_bytes(self, digest: Digest) -> bytes:
        """A whole blob.  Only for blobs known to be small (batch calls, protos)."""
        stream = await self.read(digest)
        return b"".join([chunk async for chunk in stream])

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        await self.write(digest, one_chunk(data))

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """Small blobs by digest; absent ones are left out of the result.  Blobs that
        fail verification raise `BlobsLost` (carrying the others) after all were read."""
        found: dict[Digest, bytes] = {}
        lost: dict[Digest, CasbahError] = {}
        for digest in digests:
            try:
                found[digest] = await self.read_bytes(digest)
            except BlobNotFound:
                pass
            except DataLoss as exc:
                lost[digest] = exc
        return found_or_lost(found, lost)

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        """Small blobs; one result per blob (None = stored), never raising for one bad blob."""
        results: list[Exception | None] = []
        for digest, data in blobs:
            try:
                await self.write_bytes(digest, data)
                results.append(None)
            except Exception as exc:
                results.append(exc)
        return results

    async def upstream_chunks(self, digest: Digest) -> list[Digest] | None:
        """Optional capability: when this store would fetch `digest` from an upstream that
        can split it (SplitBlob), the upstream's chunk list, so the layer above
        (`SplicedStorage`) fetches only the chunks its local side lacks and keeps them.
        None, the default: no such upstream, the blob is held here, or not worth it.
        A capability rather than an import, so `storage/` never depends on a client."""
        return None

    async def splice_upstream(self, digest: Digest, chunks: Sequence[Digest]) -> bool | None:
        """Optional capability: a SpliceBlob accepted here (the chunks verified, all held
        by this store) made known to the upstream this store writes to, so the blob is
        present there too and not only in the splicing layer's record.  True: the upstream
        spliced it; False: there is an upstream that cannot splice (the caller writes the
        blob through whole); None, the default: no upstream, nothing to do."""
        return None

    async def stats(self) -> dict[str, int]:
        """Size/object counts for metrics and the status page; cheap or empty."""
        return {}

    async def close(self) -> None:
        """Release files, connections and background tasks."""

    def children(self) -> Iterable[Storage]:
        """Decorated backends, so tools can walk the graph."""
        return ()

    @property
    def node_label(self) -> str:
        """The `node` label of storage metrics and the status page: the node's config
        path where the loader gave it one (`MetricsStorage`), else its name."""
        return self.name

    def describe(self) -> str:
        inner = ", ".join(child.describe() for child in self.children())
        return f"{self.kind}({inner})" if inner else self.kind

    # -- helpers for implementations -----------------------------------------------

    def verifier(self, digest: Digest) -> Verifier:
        return Verifier(digest) if self.verify else NoVerifier(digest)

    def read_verifier(self, digest: Digest) -> Verifier:
        """For bytes this store reads from somewhere it does not control (an upstream,
        S3, Redis): a mismatch is DataLoss naming the store, not the client's fault."""
        return ReadVerifier(digest, self.describe()) if self.verify else NoVerifier(digest)

    def check_read(self, digest: Digest, data: bytes | memoryview) -> None:
        """Verify a whole blob read into memory (batch reads, Redis values)."""
        if self.verify:
            verifier = ReadVerifier(digest, self.describe())
            verifier.update(data)
            verifier.finish()


def check_range(digest: Digest, size: int, offset: int, limit: int) -> int:
    """Validate offset/limit against a blob of `size` bytes; return bytes to serve."""
    if offset < 0 or offset > size:
        raise OutOfRange(f"read offset {offset} is outside blob {digest} of {size} bytes")
    if limit < 0:
        raise InvalidArgument(f"read limit {limit} is negative")  # ByteStream: INVALID_ARGUMENT
    remaining = size - offset
    return remaining if limit == 0 else min(limit, remaining)


class BlobsLost(DataLoss):
    """What `read_many` raises when some blobs failed verification: it carries the
    blobs that did verify (`found`) and the error of each lost one (`lost`), so a
    BatchReadBlobs answers DATA_LOSS for those blobs alone and a decorator can look
    for them elsewhere.  A decorator that does not know about it fails the whole
    batch, which is safe: nothing unverified is passed on."""

    def __init__(self, found: dict[Digest, bytes], lost: dict[Digest, CasbahError]) -> None:
        self.found = found
        self.lost = lost
        first = next(iter(lost.values()))
        super().__init__(f"{len(lost)} blob(s) failed verification: {first}")


def found_or_lost(found: dict[Digest, bytes], lost: dict[Digest, CasbahError]) -> dict[Digest, bytes]:
    """The end of a `read_many`: `found`, or BlobsLost when any blob was lost."""
    if lost:
        raise BlobsLost(found, lost)
    return found


async def read_many_partial(store: Storage, digests: Sequence[Digest]) -> tuple[dict[Digest, bytes],
                                                                             dict[Digest, CasbahError]]:
    """`store.read_many` as (verified blobs, lost blobs): for decorators that combine
    several read_many results and must keep both sides."""
    try:
        return await store.read_many(digests), {}
    except BlobsLost as exc:
        return exc.found, exc.lost


async def read_one(store: Storage, digest: Digest) -> bytes:
    """`read_bytes` through the store's own `read_many`: for decorators whose read_many
    carries the logic (filling a cache, repairing a replica), so one blob gets it too."""
    found = await store.read_many([digest])
    if digest not in found:
        raise BlobNotFound(digest)
    return found[digest]
