"""Shared Redis connections: one pool per URL, and one error translation.

A lost Redis is UNAVAILABLE with the URL and the cause in the message, so an
operator sees at once which dependency is down; the client keeps retrying on the
next request (the pool reconnects by itself once Redis is back).
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from casbah.errors import Unavailable

T = TypeVar("T")
_POOLS: dict[str, aioredis.Redis] = {}


def connect(url: str) -> aioredis.Redis:
    """A client for `url`, shared by every node that names the same URL."""
    client = _POOLS.get(url)
    if client is None:
        client = aioredis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)
        _POOLS[url] = client
    return client


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


async def call(url: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise Unavailable(f"Redis at {safe_url(url)} is unavailable: {exc}") from None
    except redis.exceptions.ResponseError as exc:
        raise Unavailable(f"Redis at {safe_url(url)} refused the command: {exc}") from None


def translated(method: Callable) -> Callable:
    """Decorator for methods of objects with a `url` attribute."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        return await call(self.url, lambda: method(self, *args, **kwargs))

    return wrapper
