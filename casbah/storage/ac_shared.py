"""ActionCache backends shared by several casbah servers: Redis and PostgreSQL.

Every server of a scaled-out deployment must see the same ActionCache, so it
cannot live in one server's disk.  PostgreSQL is the recommended default: an
acknowledged UpdateActionResult is durable (fsync'd WAL) and survives a restart;
Redis is faster but keeps that promise only when run with `appendonly yes` and
`appendfsync always` (see docs/deployment.md).

The two kinds live in one module but need different extras, so each imports
its client module when it is built: a deployment with Redis alone needs no
psycopg, and one with PostgreSQL alone no redis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from casbah.digest import Digest
from casbah.errors import ActionResultNotFound
from casbah.registry import KindOptions
from casbah.storage.action_cache import ACTION_CACHE, ActionCache

if TYPE_CHECKING:
    from psycopg import AsyncConnection

_DDL = """
CREATE TABLE IF NOT EXISTS casbah_action_cache (
    instance TEXT NOT NULL, key TEXT NOT NULL, result BYTEA NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), PRIMARY KEY (instance, key)
)
"""


class RedisActionCache(ActionCache):
    def __init__(self, url: str, prefix: str = "casbah:ac:", ttl: int | None = None) -> None:
        from casbah import redis_client

        self._client = redis_client
        self.url = url
        self.prefix = prefix
        self.ttl = ttl
        self.redis = redis_client.connect(url)

    async def get(self, action: Digest) -> bytes:
        data = await self._client.call(self.url, lambda: self.redis.get(self.prefix + action.key))
        if data is None:
            raise ActionResultNotFound(action)
        return self._client.as_bytes(data)

    async def put(self, action: Digest, result: bytes) -> None:
        await self._client.call(self.url, lambda: self.redis.set(self.prefix + action.key, result, ex=self.ttl))

    async def close(self) -> None:
        await self._client.release(self.url, self.redis)


class PostgresActionCache(ActionCache):
    def __init__(self, url: str, instance: str = "") -> None:
        self.url = url
        self.instance = instance
        from casbah.postgres_client import PgClient

        self.db = PgClient(url)

    async def get(self, action: Digest) -> bytes:
        await self.db.ensure_schema("action_cache", _DDL)

        async def q(conn: AsyncConnection[Any]) -> bytes | None:
            cur = await conn.execute(
                "SELECT result FROM casbah_action_cache WHERE instance = %s AND key = %s", (self.instance, action.key)
            )
            row = await cur.fetchone()
            return bytes(row[0]) if row else None

        data = await self.db.run(q)
        if data is None:
            raise ActionResultNotFound(action)
        return data

    async def put(self, action: Digest, result: bytes) -> None:
        await self.db.ensure_schema("action_cache", _DDL)

        async def q(conn: AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO casbah_action_cache (instance, key, result) VALUES (%s, %s, %s) "
                "ON CONFLICT (instance, key) DO UPDATE SET result = EXCLUDED.result, updated_at = now()",
                (self.instance, action.key, result),
            )

        await self.db.run(q)

    async def close(self) -> None:
        await self.db.close()


class RedisActionCacheOptions(KindOptions):
    url: str = Field(min_length=1)
    prefix: str = "casbah:ac:"
    #: Seconds an entry lives after its last write (Redis expires it); none = until evicted by Redis.
    ttl: int | None = Field(default=None, gt=0)


class PostgresActionCacheOptions(KindOptions):
    url: str = Field(min_length=1)
    #: Rows are keyed by (instance, action): instances naming the same value share entries.
    instance: str = ""


@ACTION_CACHE.register("redis", RedisActionCacheOptions)
def _redis(options: RedisActionCacheOptions, path: str) -> ActionCache:
    return RedisActionCache(options.url, options.prefix, options.ttl)


@ACTION_CACHE.register("postgres", PostgresActionCacheOptions)
def _postgres(options: PostgresActionCacheOptions, path: str) -> ActionCache:
    return PostgresActionCache(options.url, options.instance)
