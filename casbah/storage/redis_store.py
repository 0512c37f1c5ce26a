"""`redis`: small blobs in Redis, for the size-routed front of S3 or disk.

Redis manages lifetime: with `ttl` each write (and each FindMissingBlobs hit)
sets an expiry; without it, run Redis with `maxmemory-policy allkeys-lru` and it
evicts by itself.  Bulk calls are one pipeline each.  Blobs larger than
`max-blob-size` are refused (RESOURCE_EXHAUSTED): put a `size-routed` node in
front so they never get here.

Every read verifies the value against its digest (unless `verify: false`): Redis
holds bytes anyone with access to it can change, and a blob is small, so hashing
it whole costs little.  A value that fails is DataLoss, never served.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Sequence

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest
from casbah.errors import BlobNotFound, CasbahError, DataLoss, ResourceExhausted
from casbah.redis_client import as_bytes, connect, release, safe_url, translated
from casbah.storage.base import CHUNK_SIZE, BlobInfo, Storage, check_range, found_or_lost
from casbah.storage.loader import NodeOptions, register


class RedisStorage(Storage):
    kind = "redis"

    def __init__(self, *, url: str, prefix: str = "casbah:cas:", ttl: int | None = None,
                 max_blob_size: int = 1 << 20, **kwargs) -> None:
        super().__init__(**kwargs)
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.max_blob_size = max_blob_size
        self.redis = connect(url)

    def describe(self) -> str:
        return f"redis({safe_url(self.url)})"

    def _key(self, digest: Digest) -> str:
        return self.prefix + digest.key

    @translated
    async def find_missing(self, digests: Sequence[Digest]) -> Sequence[Digest]:
        if not digests:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for d in digests:
                if self.ttl:
                    pipe.expire(self._key(d), self.ttl)  # refreshes lifetime; 0 when absent
                else:
                    pipe.exists(self._key(d))
            found = await pipe.execute()
        return [d for d, ok in zip(digests, found, strict=True) if not ok]

    @translated
    async def read(self, digest: Digest, offset: int = 0, limit: int = 0) -> AsyncIterator[bytes]:
        reply = await self.redis.get(self._key(digest))
        if reply is None:
            raise BlobNotFound(digest, f"not in {self.describe()}")
        data = as_bytes(reply)
        self.check_read(digest, data)  # whole, whatever the range: a slice cannot be verified
        count = check_range(digest, len(data), offset, limit)
        return _chunks(memoryview(data)[offset : offset + count])

    @translated
    async def read_bytes(self, digest: Digest) -> bytes:
        reply = await self.redis.get(self._key(digest))
        if reply is None:
            raise BlobNotFound(digest, f"not in {self.describe()}")
        data = as_bytes(reply)
        self.check_read(digest, data)
        return data

    @translated
    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        if not digests:
            return {}
        values = await self.redis.mget([self._key(d) for d in digests])
        found: dict[Digest, bytes] = {}
        lost: dict[Digest, CasbahError] = {}
        for digest, reply in zip(digests, values, strict=True):
            if reply is None:
                continue
            value = as_bytes(reply)
            try:
                self.check_read(digest, value)
            except DataLoss as exc:
                lost[digest] = exc
                continue
            found[digest] = value
        return found_or_lost(found, lost)

    async def write(self, digest: Digest, chunks: AsyncIterable[bytes]) -> None:
        if digest.size > self.max_blob_size and self.verify:
            raise ResourceExhausted(f"blob {digest} exceeds the Redis store's max-blob-size {self.max_blob_size}")
        parts = []
        verifier = self.verifier(digest)
        async for chunk in chunks:
            verifier.update(chunk)
            parts.append(chunk)
        verifier.finish()
        await self._set([(digest, b"".join(parts))])

    async def write_bytes(self, digest: Digest, data: bytes) -> None:
        results = await self.write_many([(digest, data)])
        if results[0] is not None:
            raise results[0]

    async def write_many(self, blobs: Sequence[tuple[Digest, bytes]]) -> list[Exception | None]:
        results: list[Exception | None] = []
        good = []
        for digest, data in blobs:
            try:
                verifier = self.verifier(digest)  # wrong data is INVALID_ARGUMENT whatever its size
                verifier.update(data)
                verifier.finish()
                if len(data) > self.max_blob_size and self.verify:
                    raise ResourceExhausted(f"blob {digest} exceeds the Redis store's max-blob-size "
                                            f"{self.max_blob_size}")
                good.append((digest, data))
                results.append(None)
            except Exception as exc:
                results.append(exc)
        if good:
            await self._set(good)
        return results

    @translated
    async def _set(self, blobs: list[tuple[Digest, bytes]]) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            for digest, data in blobs:
                pipe.set(self._key(digest), data, ex=self.ttl)
            await pipe.execute()

    @translated
    async def delete(self, digests: Sequence[Digest]) -> int:
        if not digests:
            return 0
        return await self.redis.delete(*[self._key(d) for d in digests])

    async def iterate(self) -> AsyncIterator[BlobInfo]:
        """SCANs the keyspace (for GC and stats, never for requests); last access is
        now minus the key's OBJECT IDLETIME, which Redis keeps for its LRU."""
        from casbah.storage.keys import parse_key

        keys: list[bytes] = []
        for key in await self._scan():
            keys.append(key)
            if len(keys) >= 1000:
                for info in await self._infos(keys, parse_key):
                    yield info
                keys = []
        for info in await self._infos(keys, parse_key):
            yield info

    @translated
    async def _scan(self) -> list[bytes]:
        return [key async for key in self.redis.scan_iter(match=_glob_escape(self.prefix) + "*", count=1000)]

    @translated
    async def _infos(self, keys: list[bytes], parse) -> list[BlobInfo]:
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.object("idletime", key)
            idle = await pipe.execute(raise_on_error=False)
        now = time.time()
        out = []
        for key, seconds in zip(keys, idle, strict=True):
            digest = parse(key.decode()[len(self.prefix):])
            if digest is None or seconds is None:  # None: deleted meanwhile
                continue
            # An error instead of a number: an LFU policy keeps no idle time.
            out.append(BlobInfo(digest, digest.size, now - seconds if isinstance(seconds, int) else now))
        return out

    @translated
    async def stats(self) -> dict[str, int]:
        info = await self.redis.info("memory")
        return {"bytes": int(info.get("used_memory", 0)), "quota_bytes": int(info.get("maxmemory", 0))}


    async def close(self) -> None:
        await release(self.url, self.redis)


async def _chunks(data: memoryview) -> AsyncIterator[bytes]:
    """A stored blob in CHUNK_SIZE pieces, like every other store's stream."""
    for start in range(0, len(data), CHUNK_SIZE):
        yield bytes(data[start : start + CHUNK_SIZE])


def _glob_escape(text: str) -> str:
    """A prefix as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisOptions(NodeOptions):
    url: str = Field(description="redis://[:password@]host:port/db")
    prefix: str = "casbah:cas:"
    ttl: int | None = Field(default=None, gt=0, description="seconds; unset = Redis's own eviction policy")
    max_blob_size: int | str = Field(default="1M", alias="max-blob-size")


@register("redis", RedisOptions)
def _build(options: RedisOptions, loader: object, path: str) -> RedisStorage:
    return RedisStorage(url=options.url, prefix=options.prefix, ttl=options.ttl,
                        max_blob_size=parse_size(options.max_blob_size), verify=options.verify, name=path)
