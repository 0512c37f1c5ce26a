"""`MetricsStorage`: the decorator the loader puts around every node.

Counts calls, errors, bytes and latency per node and operation in Prometheus, so
backends stay free of bookkeeping.  Streams are counted as they are consumed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from prometheus_client import Counter, Histogram

from casbah.digest import Digest
from casbah.storage.base import BlobInfo, Storage

CALLS = Counter("casbah_storage_calls_total", "Storage operations", ["node", "op", "outcome"])
LATENCY = Histogram(
    "casbah_storage_latency_seconds", "Storage operation latency (stream setup for read)", ["node", "op"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
BYTES = Counter("casbah_storage_bytes_total", "Bytes through storage", ["node", "direction"])
DIGESTS = Counter("casbah_storage_digests_total", "Digests checked by find_missing", ["node", "result"])


class MetricsStorage(Storage):
    """Transparent: same name, same kind; `inner` is the real node."""

    def __init__(self, inner: Storage, node_path: str) -> None:
        super().__init__(name=inner.name, verify=inner.verify)
        self.inner = inner
        self.kind = inner.kind
        self.node_path = node_path
        self._closed = False
        labels = {"node": node_path}
        self._ok = {op: CALLS.labels(op=op, outcome="ok", **labels) for op in _OPS}
        self._err = {op: CALLS.labels(op=op, outcome="error", **labels) for op in _OPS}
        self._lat = {op: LATENCY.labels(op=op, **labels) for op in _OPS}
        self._in = BYTES.labels(direction="in", **labels)
        self._out = BYTES.labels(direction="out", **labels)
        self._hit = DIGESTS.labels(result="present", **labels)
        self._miss = DIGESTS.labels(result="missing", **labels)

    @property
    def node_label(self) -> str:
        return self.node_path or self.name

    def _done(self, op: str, started: float, ok: bool) -> None:
        (self._ok if ok else self._err)[op].inc()
        self._lat[op].observe(time.perf_counter() - started)

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        started = time.perf_counter()
        try:
            missing = await self.inner.find_missing(digests)
        except BaseException:
            self._done("find_missing", started, False)
            raise
        self._done("find_missing", started, True)
        self._miss.inc(len(missing))
        self._hit.inc(len(digests) - len(missing))
        return missing

    async def has(self, digest: Digest) -> bool:
        return await self.inner.has(digest)

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        started = time.perf_counter()
        try:
            stream = await self.inner.read(digest, offset, limit)
        except BaseException:
            self._done("read", started, False)
            raise
        self._done("read", started, True)
        return _Counted(stream, self._out)

    async def read_bytes(self, digest: Digest) -> bytes:
        started = time.perf_counter()
        try:
            data = await self.inner.read_bytes(digest)
        except BaseException:
            self._done("read", started, False)
            raise
        self._done("read", started, True)
        self._out.inc(len(data))
        return data

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        started = time.perf_counter()
        try:
            found = await self.inner.read_many(digests)
        except BaseException:
            self._done("read_many", started, False)
            raise
        self._done("read_many", started, True)
        self._out.inc(sum(len(v) for v in found.values()))
        return found

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        started = time.perf_counter()
        try:
            await self.inner.write(digest, _Counted(chunks, self._in))
        except BaseException:
            self._done("write", started, False)
            raise
        self._done("write", started, True)

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        started = time.perf_counter()
        try:
            await self.inner.write_bytes(digest, data)
        except BaseException:
            self._done("write", started, False)
            raise
        self._done("write", started, True)
        self._in.inc(len(data))

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        started = time.perf_counter()
        try:
            results = await self.inner.write_many(blobs)
        except BaseException:
            self._done("write_many", started, False)
            raise
        self._done("write_many", started, True)
        self._in.inc(sum(len(data) for (_, data), err in zip(blobs, results, strict=True) if err is None))
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        started = time.perf_counter()
        try:
            removed = await self.inner.delete(digests)
        except BaseException:
            self._done("delete", started, False)
            raise
        self._done("delete", started, True)
        return removed

    def iterate(self) -> AsyncIterator[BlobInfo]:
        return self.inner.iterate()

    async def upstream_chunks(self, digest: Digest) -> list[Digest] | None:
        return await self.inner.upstream_chunks(digest)

    async def splice_upstream(self, digest: Digest, chunks: Sequence[Digest]) -> bool | None:
        return await self.inner.splice_upstream(digest, chunks)

    async def stats(self) -> dict[str, int]:
        return await self.inner.stats()

    async def close(self) -> None:
        """Idempotent: a node shared by several decorators is closed by each of them."""
        if not self._closed:
            self._closed = True
            await self.inner.close()

    def children(self) -> Iterable[Storage]:
        return self.inner.children()

    def describe(self) -> str:
        return self.inner.describe()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


_OPS = ("find_missing", "read", "read_many", "write", "write_many", "delete")


class _Counted:
    """Counts the bytes of a stream as they pass.

    A class rather than an async generator: closing an async generator that was
    never started does not run its `finally`, so the inner stream (a disk read
    holding an open file and a pin against eviction) would stay open until
    garbage collection.  `aclose` here always reaches the inner stream.
    """

    __slots__ = ("_counter", "_it", "_stream")

    def __init__(self, stream: AsyncIterable[bytes], counter: Counter) -> None:
        self._stream = stream
        self._it = aiter(stream)
        self._counter = counter

    def __aiter__(self) -> _Counted:
        return self

    async def __anext__(self) -> bytes:
        chunk = await anext(self._it)
        self._counter.inc(len(chunk))
        return chunk

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()
