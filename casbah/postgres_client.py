"""Shared PostgreSQL connection pools and one error translation.

A lost PostgreSQL is UNAVAILABLE naming the server (never the password); the
pool reconnects by itself when it comes back.  Schemas are created on first use
with `CREATE … IF NOT EXISTS`, so several casbah processes can start at once.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from psycopg_pool import AsyncConnectionPool

from casbah.errors import Unavailable

T = TypeVar("T")
_POOLS: dict[str, AsyncConnectionPool] = {}
_SCHEMAS: set[tuple[str, str]] = set()


def safe_url(url: str) -> str:
    return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", url)


async def pool(url: str) -> AsyncConnectionPool:
    p = _POOLS.get(url)
    if p is None:
        p = AsyncConnectionPool(url, min_size=1, max_size=16, open=False, timeout=10,
                                kwargs={"autocommit": True})
        _POOLS[url] = p
        await p.open(wait=False)
    return p


async def run(url: str, fn: Callable[[psycopg.AsyncConnection], Awaitable[T]]) -> T:
    """Run `fn(connection)`; connection failures become Unavailable."""
    try:
        p = await pool(url)
        async with p.connection() as conn:
            return await fn(conn)
    except (TimeoutError, psycopg.OperationalError, psycopg.InterfaceError, OSError) as exc:
        raise Unavailable(f"PostgreSQL at {safe_url(url)} is unavailable: {str(exc).strip()[:300]}") from None
    except Exception as exc:
        if type(exc).__name__ == "PoolTimeout":
            raise Unavailable(f"PostgreSQL at {safe_url(url)} is unavailable: no connection in 10s") from None
        raise


async def ensure_schema(url: str, name: str, ddl: str) -> None:
    if (url, name) in _SCHEMAS:
        return

    async def create(conn: psycopg.AsyncConnection) -> None:
        async with conn.transaction():
            # Serialize concurrent first starts: CREATE IF NOT EXISTS can race in PostgreSQL.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"casbah:{name}",))
            await conn.execute(ddl)

    await run(url, create)
    _SCHEMAS.add((url, name))
