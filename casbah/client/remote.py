"""A synchronous facade over the one REAPI client (`casbah.reapi.cas`), for the CLI, the
local cache's push and pull, and source caching.

The async client runs on an event loop in a background thread; each call here
hands it a coroutine and waits (`asyncio.run_coroutine_threadsafe`).  So planning
(FindMissingBlobs groups, batch packing, the small/large cut, digest-function
grouping), ByteStream resume, retries and verification are the same code the
server's `remote` backend runs.  What stays here is what only a synchronous caller
has: blobs given as files (read in worker threads, streamed with resume at the
server's `committed_size`), sinks that write downloads to disk (called from a
bounded pool of threads, so several files are written at once), progress
callbacks, and the transfer counters for summaries.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, CasbahError
from casbah.reapi import chunked, plan
from casbah.reapi.cas import CasClient
from casbah.reapi.channel import RemoteSpec, open_channel
from casbah.reapi.connection import AsyncRemote
from casbah.reapi.retry import RetryPolicy
from casbah.streams import CHUNK_SIZE, ReadVerifier

__all__ = ["RemoteClient", "RemoteSpec", "open_channel"]

T = TypeVar("T")

#: Where a blob comes from on upload: its bytes, or a file to stream.
Source = bytes | Path


@dataclass
class Transfer:
    """Counts for summaries and progress bars; updated from worker threads."""

    blobs: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, blobs: int, nbytes: int) -> None:
        with self._lock:
            self.blobs += blobs
            self.bytes += nbytes


Progress = Callable[[int, int], None]  # (blobs, bytes) just completed


class RemoteClient:
    """One server, synchronously.  `compression`: "identity" by default (what this client
    always did: on a LAN the zstd CPU costs more than the bytes saved), "auto" or "zstd"."""

    def __init__(self, spec: RemoteSpec, policy: RetryPolicy | None = None, parallelism: int = 4,
                 compression: str = "identity") -> None:
        self.spec = spec
        self.policy = policy or RetryPolicy()
        self.parallelism = parallelism
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="casbah-reapi", daemon=True)
        self._thread.start()
        self.client = CasClient(AsyncRemote(spec, self.policy), compression, parallel=max(parallelism, 1))
        self._pool = ThreadPoolExecutor(max_workers=parallelism, thread_name_prefix="casbah-remote")
        self._batch_limit: int | None = None
        self.uploaded = Transfer()
        self.downloaded = Transfer()

    def __enter__(self) -> RemoteClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._loop.is_running():
            self.run(self.client.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._loop.close()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run one call of the async client (`self.client`) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def instance(self) -> str:
        return self.spec.instance

    @property
    def batch_limit(self) -> int:
        if self._batch_limit is None:
            self._batch_limit = self.run(self.client.batch_limit())
        return self._batch_limit

    # -- existence -----------------------------------------------------------------

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return self.run(self.client.find_missing(list(dict.fromkeys(digests))))

    # -- uploads -------------------------------------------------------------------

    def upload(self, blobs: dict[Digest, Source], progress: Progress | None = None) -> None:
        """Upload every blob given (callers pass only what find_missing reported)."""
        limit = self.batch_limit
        small, large = plan.split_by_size(blobs.items(), limit, _digest_of)
        jobs = [self._pool.submit(self._batch_upload, batch, progress)
                for batch in plan.pack_batches(small, limit, _digest_of)]
        jobs += [self._pool.submit(self._stream_upload, d, s, progress) for d, s in large]
        for job in jobs:
            job.result()

    def _batch_upload(self, batch: list[tuple[Digest, Source]], progress: Progress | None) -> None:
        blobs = [(digest, source if isinstance(source, bytes) else _read_file(source)) for digest, source in batch]
        errors = self.run(self.client.update_batch(blobs))
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error
        self._done(self.uploaded, progress, len(batch), sum(d.size for d, _ in batch))

    def _stream_upload(self, digest: Digest, source: Source, progress: Progress | None) -> None:
        """One large blob, its progress reported chunk by chunk (a bar for one big file
        moves as it goes); a resumed write re-reads from the server's offset, and only
        bytes beyond what was already reported count again.  When the server splices,
        only the chunks it lacks are sent (`reapi/chunked.py`); the counter says so."""
        moved = 0

        def advance(nbytes: int) -> None:
            nonlocal moved
            moved += nbytes
            if progress:
                progress(0, nbytes)

        sent = self.run(chunked.upload_chunked(self.client, digest, source, advance))
        if sent is not None:
            self.uploaded.add(1, sent)
            if progress:
                progress(1, digest.size - moved)
            return
        reported = 0

        async def chunks(offset: int) -> AsyncIterator[bytes]:
            nonlocal reported
            position = offset
            async for chunk in _chunks(source, offset):
                yield chunk
                position += len(chunk)
                if progress and position > reported:
                    progress(0, position - reported)
                    reported = position

        self.run(self.client.write_reopenable(digest, chunks))
        self.uploaded.add(1, digest.size)
        if progress:
            progress(1, digest.size - reported)

    @staticmethod
    def _done(counter: Transfer, progress: Progress | None, blobs: int, nbytes: int) -> None:
        counter.add(blobs, nbytes)
        if progress:
            progress(blobs, nbytes)

    # -- downloads -----------------------------------------------------------------

    def download(self, digests: Iterable[Digest], sink: Callable[[Digest, Iterator[bytes]], None],
                 progress: Progress | None = None, chunks: chunked.ChunkStore | None = None) -> None:
        """Fetch blobs; `sink(digest, chunks)` stores each (from worker threads).

        Content is verified before it reaches the sink's last chunk: a corrupt
        download raises DataLoss.  A missing blob raises BlobNotFound.  With a
        `chunks` store (the local cache), a large blob the server can split is
        fetched as the chunks the store lacks and assembled from it.
        """
        limit = self.batch_limit
        small, large = plan.split_by_size(dict.fromkeys(digests), limit, _itself)
        jobs = [self._pool.submit(self._batch_download, batch, sink, progress)
                for batch in plan.pack_batches(small, limit, _itself)]
        jobs += [self._pool.submit(self._stream_download, d, sink, progress, chunks) for d in large]
        for job in jobs:
            job.result()

    def _batch_download(self, digests: list[Digest], sink: Callable, progress: Progress | None) -> None:
        lost: dict[Digest, CasbahError] = {}
        found = self.run(self.client.read_batch(digests, True, lost, self.spec.url))
        if lost:
            raise next(iter(lost.values()))
        for digest in digests:
            if digest not in found:
                raise BlobNotFound(digest, f"not on {self.spec.url}")
            sink(digest, iter((found[digest],)))
        self._done(self.downloaded, progress, len(digests), sum(d.size for d in digests))

    def _stream_download(self, digest: Digest, sink: Callable, progress: Progress | None,
                         store: chunked.ChunkStore | None = None) -> None:
        """One large blob, its progress reported chunk by chunk as the sink takes them; with
        a chunk store and a server that splits, only the chunks the store lacks travel."""
        parts = self.run(chunked.split(self.client, digest)) if store is not None else None
        if parts is not None and store is not None:
            received = self.run(chunked.fetch_chunks(self.client, parts, store))
            sink(digest, chunked.assemble(digest, parts, store, self.spec.url))
            self.downloaded.add(1, received)
            if progress:
                progress(1, digest.size)
            return
        reported = 0

        def chunks() -> Iterator[bytes]:
            nonlocal reported
            for chunk in self.read_stream(digest):
                yield chunk
                reported += len(chunk)
                if progress:
                    progress(0, len(chunk))

        sink(digest, chunks())
        self.downloaded.add(1, digest.size)
        if progress:
            progress(1, max(digest.size - reported, 0))

    def read_stream(self, digest: Digest) -> Iterator[bytes]:
        """ByteStream.Read, verified, resuming at the delivered offset after a transient failure."""
        stream = self.run(self.client.read(digest, verifier=ReadVerifier(digest, self.spec.url)))
        try:
            while (chunk := self.run(_next(stream))) is not None:
                yield chunk
        finally:
            self.run(stream.aclose())

    def read_bytes(self, digest: Digest) -> bytes:
        return b"".join(self.read_stream(digest))

    def check_writable(self) -> None:
        """PermissionDenied (one line) when the server will refuse uploads: ask before sending."""
        self.run(self.client.check_writable())

    # -- trees and names -------------------------------------------------------------

    def get_tree(self, root: Digest) -> dict[Digest, bytes]:
        """Every Directory of a tree, serialized, by digest."""
        return self.run(self.client.get_tree(root))

    def fetch_directory(self, uris: list[str], qualifiers: dict[str, str] | None = None,
                        function: DigestFunction = DigestFunction.SHA256) -> Digest:
        """The root a Remote Asset names; `AssetNotFound` on a miss, however the server reports it."""
        d = self.run(self.client.fetch_directory(uris, qualifiers, function)).root_directory_digest
        return Digest(d.hash, d.size_bytes, function)

    def fetch_blob(self, uris: list[str], qualifiers: dict[str, str] | None = None,
                   function: DigestFunction = DigestFunction.SHA256) -> Digest:
        """The blob a Remote Asset names; `AssetNotFound` on a miss, however the server reports it."""
        d = self.run(self.client.fetch_blob(uris, qualifiers, function)).blob_digest
        return Digest(d.hash, d.size_bytes, function)

    def push_directory(self, uris: list[str], root: Digest, qualifiers: dict[str, str] | None = None) -> None:
        self.run(self.client.push_directory(uris, root, qualifiers))

    def push_blob(self, uris: list[str], blob: Digest, qualifiers: dict[str, str] | None = None) -> None:
        self.run(self.client.push_blob(uris, blob, qualifiers))

    def get_reference(self, key: str) -> Digest:
        """The tree a BuildStream reference names; `AssetNotFound` when the server has none."""
        return self.run(self.client.get_reference(key))

    def update_reference(self, keys: list[str], root: Digest) -> None:
        self.run(self.client.update_reference(keys, root))


async def _next(stream: AsyncIterator[bytes]) -> bytes | None:
    return await anext(stream, None)


def _digest_of(item: tuple[Digest, Source]) -> Digest:
    return item[0]


def _itself(digest: Digest) -> Digest:
    return digest


def _read_file(path: Path) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return f.readall()


async def _chunks(source: Source, offset: int) -> AsyncIterator[bytes]:
    """A source from `offset`, in chunks; file reads hop to a thread (the loop serves every call)."""
    if isinstance(source, bytes):
        for i in range(offset, len(source), CHUNK_SIZE):
            yield source[i : i + CHUNK_SIZE]
        return
    f = await asyncio.to_thread(open, source, "rb", buffering=0)
    try:
        f.seek(offset)
        while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
            yield chunk
    finally:
        f.close()
