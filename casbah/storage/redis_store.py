"""`redis`: small blobs in Redis, for the size-routed front of S3 or disk.

Redis manages lifetime: with `ttl` each write (and each FindMissingBlobs hit)
sets an expiry; without it, run Redis with `maxmemory-policy allkeys-lru` and it
evicts by itself.  Bulk calls are one pipeline each.  Blobs larger than
`max-blob-size` are refused (RESOURCE_EXHAUSTED): put a `size-routed` node in
front so they never get here.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest
from casbah.errors import BlobNotFound, ResourceExhausted
from casbah.redis_client import connect, safe_url, translated
from casbah.storage.base import BlobInfo, Storage, check_range
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
    async def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
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
        data = await self.redis.get(self._key(digest))
        if data is None:
            raise BlobNotFound(digest, f"not in {self.describe()}")
        count = check_range(digest, len(data), offset, limit)
        return _one(data[offset : offset + count])

    @translated
    async def read_bytes(self, digest: Digest) -> bytes:
        data = await self.redis.get(self._key(digest))
        if data is None:
            raise BlobNotFound(digest, f"not in {self.describe()}")
        return data

    @translated
    async def read_many(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        if not digests:
            return {}
        values = await self.redis.mget([self._key(d) for d in digests])
        return {d: v for d, v in zip(digests, values, strict=True) if v is not None}

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
                if len(data) > self.max_blob_size and self.verify:
                    raise ResourceExhausted(f"blob {digest} exceeds max-blob-size {self.max_blob_size}")
                verifier = self.verifier(digest)
                verifier.update(data)
                verifier.finish()
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
        from casbah.storage.disk import _parse_key

        async for key in self.redis.scan_iter(match=self.prefix + "*", count=1000):
            digest = _parse_key(key.decode()[len(self.prefix):])
            if digest is not None:
                yield BlobInfo(digest, digest.size, 0.0)

    @translated
    async def stats(self) -> dict[str, int]:
        info = await self.redis.info("memory")
        return {"bytes": int(info.get("used_memory", 0)), "quota_bytes": int(info.get("maxmemory", 0))}


async def _one(data: bytes) -> AsyncIterator[bytes]:
    yield data


class RedisOptions(NodeOptions):
    url: str = Field(description="redis://[:password@]host:port/db")
    prefix: str = "casbah:cas:"
    ttl: int | None = Field(default=None, gt=0, description="seconds; unset = Redis's own eviction policy")
    max_blob_size: int | str = Field(default="1M", alias="max-blob-size")


@register("redis", RedisOptions)
def _build(options: RedisOptions, loader: object, path: str) -> RedisStorage:
    return RedisStorage(url=options.url, prefix=options.prefix, ttl=options.ttl,
                        max_blob_size=parse_size(options.max_blob_size), verify=options.verify, name=path)
