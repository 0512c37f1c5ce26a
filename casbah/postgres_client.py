"""Shared PostgreSQL connection pools and one error translation.

A lost PostgreSQL is UNAVAILABLE naming the server (never the password), at once
rather than after a pool timeout, and casbah recovers as soon as PostgreSQL is back:

- while the server is up, statements run on pooled connections;
- the first connection failure marks the server down; from then on each request
  tries a direct connection (failing fast with the real cause, e.g. "connection
  refused", while PostgreSQL is down);
- the first direct connection that works marks it up again and replaces the pool
  with a fresh one, because the old pool may be far into its reconnection backoff
  and would make requests wait for it.

Pools are per (event loop, URL): shared by every node of a config that names the
same database, never used from another loop.  Each node holds a `PgClient`; the
last one closed closes the pool.  Schemas are created on first use with
`CREATE … IF NOT EXISTS` under an advisory lock, so several casbah processes can
start at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from casbah.errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Longest wait for a pooled connection while the server is up (all busy: overload).
POOL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5
_SCHEMAS: set[tuple[str, str]] = set()


def safe_url(url: str) -> str:
    return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", url)


class _Database:
    """One URL's pool in one event loop, and whether the server is known to be down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.users = 0
        self.down = False
        self.pool: AsyncConnectionPool | None = None
        self._retired: set[asyncio.Task] = set()

    async def get_pool(self) -> AsyncConnectionPool:
        if self.pool is None:
            self.pool = AsyncConnectionPool(self.url, min_size=1, max_size=16, open=False, timeout=POOL_TIMEOUT,
                                            reconnect_timeout=30, kwargs={"autocommit": True,
                                                                          "connect_timeout": CONNECT_TIMEOUT})
            await self.pool.open(wait=False)
        return self.pool

    def renew_pool(self) -> None:
        old, self.pool = self.pool, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(old.close(timeout=5))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def close(self) -> None:
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.close(timeout=5)
            self.pool = None
        for task in list(self._retired):
            with contextlib.suppress(BaseException):
                await task


_DATABASES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _Database]] = \
    weakref.WeakKeyDictionary()


def _database(url: str) -> _Database:
    databases = _DATABASES.setdefault(asyncio.get_running_loop(), {})
    db = databases.get(url)
    if db is None:
        db = databases[url] = _Database(url)
    return db


class PgClient:
    """One user's handle on a database: registers with the shared pool of its event
    loop on first use, and `close()` gives it back (the last user closes the pool)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._db: _Database | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _get(self) -> _Database:
        loop = asyncio.get_running_loop()
        if self._db is None or self._loop is not loop:
            self._db, self._loop = _database(self.url), loop
            self._db.users += 1
        return self._db

    async def run(self, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
        """Run `fn(connection)` (autocommit); connection failures become Unavailable."""
        return await _run(self._get(), fn)

    async def ensure_schema(self, name: str, ddl: str) -> None:
        if (self.url, name) in _SCHEMAS:
            return

        async def create(conn: psycopg.AsyncConnection) -> None:
            async with conn.transaction():
                # Serialize concurrent first starts: CREATE IF NOT EXISTS can race in PostgreSQL.
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"casbah:{name}",))
                await conn.execute(ddl)

        await self.run(create)
        _SCHEMAS.add((self.url, name))

    async def close(self) -> None:
        db, loop, self._db = self._db, self._loop, None
        if db is None or loop is not asyncio.get_running_loop():
            return
        db.users -= 1
        if db.users <= 0:
            _DATABASES.get(loop, {}).pop(self.url, None)
            await db.close()


def _unavailable(url: str, exc: BaseException) -> Unavailable:
    if isinstance(exc, PoolTimeout):
        cause = f"no connection within {POOL_TIMEOUT:.0f}s (overloaded?)"
    else:
        cause = " ".join(str(exc).split())[:300] or type(exc).__name__
    return Unavailable(f"PostgreSQL at {safe_url(url)} is unavailable: {cause}")


_CONNECTION_ERRORS = (TimeoutError, psycopg.OperationalError, psycopg.InterfaceError, OSError)


async def _run(db: _Database, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
    url = db.url
    if db.down:
        try:
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT)
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(url, exc) from None
        try:
            async with conn:
                result = await fn(conn)
        except _CONNECTION_ERRORS as exc:
            raise _unavailable(url, exc) from None
        if db.down:
            log.info("PostgreSQL at %s is back", safe_url(url))
            db.down = False
            db.renew_pool()
        return result
    try:
        pool = await db.get_pool()
        async with pool.connection() as conn:
            return await fn(conn)
    except _CONNECTION_ERRORS as exc:
        if not db.down and not _is_query_error(exc):
            log.warning("PostgreSQL at %s is unavailable: %s", safe_url(url), exc)
            db.down = True
        raise _unavailable(url, exc) from None


def _is_query_error(exc: BaseException) -> bool:
    """An OperationalError about this statement (a lock or statement timeout, a
    serialization failure), not about the server: no reason to mark it down."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate.startswith(("40", "55", "57014"))
