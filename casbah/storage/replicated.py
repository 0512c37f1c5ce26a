"""`replicated`: every blob on several backends.

Writes go to all replicas at once and succeed when `quorum` of them did (default:
all).  Reads try replicas in order; when an earlier replica lacks a blob a later
one has, the read repairs it on the way (the stream is teed into the replica
that missed it).  A blob is missing only if every replica lacks it.

A replica whose copy fails verification (DataLoss: a `remote`, S3 or Redis
replica verifies what it reads) is skipped for the next: at open, and in a
batch, the read goes on to the other replicas at once.  A stream that fails
verification at its end cannot be switched (its first bytes are already out), so
it fails with DATA_LOSS; the replica is remembered as bad for that blob and
tried last, so the client's retry is served by another replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Sequence

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss, DigestMismatch, Unavailable
from casbah.storage.base import BlobInfo, Storage, found_or_lost, read_many_partial, read_one
from casbah.storage.loader import NodeOptions, StorageLoader, register
from casbah.storage.read_through import TeeStream, close_all, put_unless_done

log = logging.getLogger(__name__)
_QUEUE = 4
#: (replica, blob) pairs whose copy failed verification, remembered (oldest dropped first).
_SUSPECTS = 4096


class ReplicatedStorage(Storage):
    kind = "replicated"

    def __init__(self, replicas: list[Storage], quorum: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if not replicas:
            raise ValueError("replicated storage needs at least one replica")
        self.replicas = replicas
        self.quorum = quorum or len(replicas)
        if not 1 <= self.quorum <= len(replicas):
            raise ValueError(f"quorum {self.quorum} must be between 1 and {len(replicas)}")
        self.repairs = 0
        self._suspects: collections.OrderedDict[tuple[int, Digest], None] = collections.OrderedDict()

    def _suspect(self, index: int, digest: Digest) -> None:
        self._suspects[(index, digest)] = None
        while len(self._suspects) > _SUSPECTS:
            self._suspects.popitem(last=False)

    def _order(self, digest: Digest) -> list[int]:
        """Replica indexes in order, those whose copy of `digest` was lost last."""
        indexes = range(len(self.replicas))
        if not self._suspects:
            return list(indexes)
        return sorted(indexes, key=lambda i: (i, digest) in self._suspects)

    def children(self) -> Iterable[Storage]:
        return self.replicas

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        """Missing only where every replica that answered lacks it; if none answered,
        the error (reporting everything missing would make clients upload in vain)."""
        missing: Sequence[Digest] = list(digests)
        answered = False
        error: CasbahError | None = None
        for replica in self.replicas:
            if not missing:
                break
            try:
                missing = await replica.find_missing(missing)
                answered = True
            except CasbahError as exc:
                log.warning("replica %s: find_missing failed: %s", replica.name, exc)
                error = exc
        if not answered and error is not None:
            raise error
        return missing

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        lacking: list[Storage] = []
        last: Exception = BlobNotFound(digest)
        for index in self._order(digest):
            replica = self.replicas[index]
            try:
                stream = await replica.read(digest, offset, limit)
            except BlobNotFound:
                lacking.append(replica)
                continue
            except CasbahError as exc:
                log.warning("replica %s: read %s failed: %s", replica.name, digest, exc)
                if isinstance(exc, DataLoss):
                    self._suspect(index, digest)
                last = exc
                continue
            stream = _Watched(stream, functools.partial(self._suspect, index, digest))
            if lacking and not offset and not limit:
                self.repairs += len(lacking)
                for target in lacking:
                    log.info("replicated: repairing %s on %s", digest, target.name)
                    stream = TeeStream(target, digest, stream)
            return stream
        raise last

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found: dict[Digest, bytes] = {}
        lost: dict[Digest, CasbahError] = {}
        wanted = list(digests)
        lacking: list[tuple[Storage, list[Digest]]] = []
        for index, replica in enumerate(self.replicas):
            if not wanted:
                break
            try:
                got, lost_here = await read_many_partial(replica, wanted)
            except CasbahError as exc:
                log.warning("replica %s: read_many failed: %s", replica.name, exc)
                continue
            found.update(got)
            for digest, error in lost_here.items():  # failed verification: the next replica is asked
                log.warning("replica %s: %s", replica.name, error)
                self._suspect(index, digest)
                lost[digest] = error
            # Repaired: the blobs this replica lacks, not those it holds a bad copy of
            # (it would take the write for a duplicate and keep its copy).
            lacking.append((replica, [d for d in wanted if d not in got and d not in lost_here]))
            wanted = [d for d in wanted if d not in got]
        for replica, missed in lacking:
            repair = [(d, found[d]) for d in missed if d in found]
            if repair:
                self.repairs += len(repair)
                with contextlib.suppress(CasbahError):
                    await replica.write_many(repair)
        return found_or_lost(found, {d: e for d, e in lost.items() if d not in found})

    async def read_bytes(self, digest: Digest) -> bytes:
        return await read_one(self, digest)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        """Fan one stream out to every replica; the slowest sets the pace (bounded queues).

        A replica that ends early (it failed, or already had the blob) is skipped; when
        every replica has ended, the source is not read any further.
        """
        queues: list[asyncio.Queue] = [asyncio.Queue(_QUEUE) for _ in self.replicas]

        async def feed(queue: asyncio.Queue) -> AsyncIterator[bytes]:
            while (chunk := await queue.get()) is not None:
                yield chunk

        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(r.write(digest, feed(q))) for r, q in zip(self.replicas, queues, strict=True)]
        received = 0
        try:
            async for chunk in chunks:
                received += len(chunk)
                if self.verify and received > digest.size:
                    # Checked here too: the replicas would notice only after the queues
                    # filled, and an endless upload must be cut off at once.
                    raise DigestMismatch(f"upload for {digest} has more than the {digest.size} bytes its "
                                         "digest names")
                for queue, task in zip(queues, tasks, strict=True):
                    await put_unless_done(queue, chunk, task)
                if all(task.done() for task in tasks):
                    break
            for queue, task in zip(queues, tasks, strict=True):
                await put_unless_done(queue, None, task)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        results = await asyncio.gather(*tasks, return_exceptions=True)
        self._check_quorum(digest, results)

    def _check_quorum(self, digest: Digest, results: Sequence[object]) -> None:
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(results) - len(errors) >= self.quorum:
            for replica, result in zip(self.replicas, results, strict=True):
                if isinstance(result, BaseException):
                    log.warning("replica %s missed %s: %s", replica.name, digest, result)
            return
        invalid = [e for e in errors if isinstance(e, CasbahError) and e.code.name == "INVALID_ARGUMENT"]
        if invalid:
            raise invalid[0]
        raise Unavailable(f"{digest}: stored on {len(results) - len(errors)} replicas, quorum is {self.quorum}: "
                          f"{errors[0]}")

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        error = (await self.write_many([(digest, data)]))[0]
        if error is not None:
            raise error

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        per_replica = await asyncio.gather(*(r.write_many(blobs) for r in self.replicas), return_exceptions=True)
        results: list[Exception | None] = []
        for i, (digest, _) in enumerate(blobs):
            outcomes = [r if isinstance(r, BaseException) else r[i] for r in per_replica]
            try:
                self._check_quorum(digest, [o if o is not None else True for o in outcomes])
                results.append(None)
            except CasbahError as exc:
                results.append(exc)
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        counts = await asyncio.gather(*(r.delete(digests) for r in self.replicas))
        return max(counts)

    def iterate(self) -> AsyncIterator[BlobInfo]:
        return self.replicas[0].iterate()

    async def close(self) -> None:
        await close_all(self.replicas)


class _Watched:
    """A replica's read stream that reports a verification failure at its end (so the
    replica is tried last next time) and passes everything else through."""

    __slots__ = ("_lost", "_stream")

    def __init__(self, stream: AsyncIterator[bytes], lost: Callable[[], None]) -> None:
        self._stream = stream
        self._lost = lost

    def __aiter__(self) -> _Watched:
        return self

    async def __anext__(self) -> bytes:
        try:
            return await anext(self._stream)
        except DataLoss:
            self._lost()
            raise

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


class ReplicatedOptions(NodeOptions):
    replicas: list[str | dict] = Field(min_length=1)
    quorum: int | None = Field(default=None, ge=1)


@register("replicated", ReplicatedOptions)
def _build(options: ReplicatedOptions, loader: StorageLoader, path: str) -> ReplicatedStorage:
    replicas = [loader.build(node, f"{path}.replicas[{i}]") for i, node in enumerate(options.replicas)]
    return ReplicatedStorage(replicas, options.quorum, name=path)
