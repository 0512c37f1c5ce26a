"""`blob-index`: a PostgreSQL index of what a slow store holds (digest, size, last access).

In front of S3, FindMissingBlobs becomes one indexed query instead of one HEAD per
digest.  Writes are recorded after the backend accepted them; reads and hits
only queue a last-access update, flushed in one statement every
`flush-interval` seconds (the data an expiry job needs, without a write per
read).  The index can only be behind the store, never ahead of it: a blob it
does not know is reported missing and simply uploaded again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import CasbahError
from casbah.postgres_client import PgClient, safe_url
from casbah.storage.base import BlobInfo, Storage
from casbah.storage.loader import NodeOptions, StorageLoader, register

log = logging.getLogger(__name__)

_DDL = """
CREATE TABLE IF NOT EXISTS casbah_blobs (
    store TEXT NOT NULL, key TEXT NOT NULL, size BIGINT NOT NULL,
    last_access TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (store, key)
);
CREATE INDEX IF NOT EXISTS casbah_blobs_access ON casbah_blobs (store, last_access);
"""


class BlobIndexStorage(Storage):
    kind = "blob-index"

    def __init__(self, inner: Storage, url: str, store: str = "default", flush_interval: float = 5.0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.inner = inner
        self.url = url
        self.db = PgClient(url)
        self.store = store
        self.flush_interval = flush_interval
        self._touched: set[str] = set()
        self._flusher: asyncio.Task | None = None
        self._closed = False

    def children(self) -> Iterable[Storage]:
        return (self.inner,)

    def describe(self) -> str:
        return f"blob-index({safe_url(self.url)}, {self.inner.describe()})"

    async def _ready(self) -> None:
        await self.db.ensure_schema("blobs", _DDL)
        if self._flusher is None and not self._closed:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _record(self, digests: list[Digest]) -> None:
        if not digests:
            return
        await self._ready()

        async def q(conn):
            async with conn.cursor() as cur:
                await cur.executemany(
                    "INSERT INTO casbah_blobs (store, key, size) VALUES (%s, %s, %s) "
                    "ON CONFLICT (store, key) DO UPDATE SET last_access = now()",
                    [(self.store, d.key, d.size) for d in digests],
                )

        await self.db.run(q)

    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        await self._ready()
        keys = [d.key for d in digests]

        async def q(conn):
            cur = await conn.execute("SELECT key FROM casbah_blobs WHERE store = %s AND key = ANY(%s)",
                                     (self.store, keys))
            return {row[0] for row in await cur.fetchall()}

        present = await self.db.run(q)
        self._touched.update(present)
        return [d for d in digests if d.key not in present]

    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        stream = await self.inner.read(digest, offset, limit)
        self._touched.add(digest.key)
        return stream

    async def read_bytes(self, digest: Digest) -> bytes:
        data = await self.inner.read_bytes(digest)
        self._touched.add(digest.key)
        return data

    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        found = await self.inner.read_many(digests)
        self._touched.update(d.key for d in found)
        return found

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        await self.inner.write(digest, chunks)
        await self._record([digest])

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results = await self.inner.write_many(blobs)
        await self._record([d for (d, _), err in zip(blobs, results, strict=True) if err is None])
        return results

    async def delete(self, digests: Sequence[Digest]) -> int:
        await self._ready()
        removed = await self.inner.delete(digests)
        keys = [d.key for d in digests]
        await self.db.run(lambda conn: conn.execute(
            "DELETE FROM casbah_blobs WHERE store = %s AND key = ANY(%s)", (self.store, keys)))
        return removed

    def iterate(self) -> AsyncIterator[BlobInfo]:
        return self.inner.iterate()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except CasbahError as exc:
                log.warning("blob index: last-access flush failed: %s", exc)

    async def flush(self) -> None:
        touched, self._touched = self._touched, set()
        if touched:
            await self._ready()
            keys = sorted(touched)
            await self.db.run(lambda conn: conn.execute(
                "UPDATE casbah_blobs SET last_access = now() WHERE store = %s AND key = ANY(%s)", (self.store, keys)))

    async def close(self) -> None:
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher
        with contextlib.suppress(CasbahError):
            await self.flush()
        await self.db.close()
        await self.inner.close()


class BlobIndexOptions(NodeOptions):
    url: str = Field(description="postgresql://user:password@host:port/db")
    backend: str | dict
    store: str = Field(default="default", description="name of this store in the index table")
    flush_interval: float = Field(default=5.0, alias="flush-interval", gt=0)


@register("blob-index", BlobIndexOptions)
def _build(options: BlobIndexOptions, loader: StorageLoader, path: str) -> BlobIndexStorage:
    return BlobIndexStorage(loader.build(options.backend, f"{path}.backend"), options.url, options.store,
                            options.flush_interval, name=path)
