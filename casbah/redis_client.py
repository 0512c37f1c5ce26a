"""Shared Redis connections: one pool per URL and event loop, and one error translation.

A lost Redis is UNAVAILABLE with the URL (never its password) and the cause in the
message, so an operator sees at once which dependency is down.  Nothing needs to
be reset when Redis comes back: the pool opens a new connection for the next
command.

Clients are shared per (event loop, URL): every node of a config naming the same
Redis shares one pool, but a pool is never used from another event loop than the
one it was made in (its connections belong to that loop), which matters for
anything that builds storage in more than one loop (tests, tools).  Nodes take a
client with `connect()` and give it back with `release()`; the last release
closes the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions

from casbah.errors import ResourceExhausted, Unavailable

T = TypeVar("T")
_CLIENTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, list]] = weakref.WeakKeyDictionary()


def _loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _new(url: str) -> aioredis.Redis:
    return aioredis.from_url(url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30)


def connect(url: str) -> aioredis.Redis:
    """A client for `url`, shared by every node of this event loop that names the same URL."""
    loop = _loop()
    if loop is None:  # not in a loop: nothing to share safely
        return _new(url)
    clients = _CLIENTS.setdefault(loop, {})
    entry = clients.get(url)
    if entry is None:
        entry = clients[url] = [_new(url), 0]
    entry[1] += 1
    return entry[0]


async def release(url: str, client: aioredis.Redis) -> None:
    """Give back a client from `connect()`; the pool closes when nobody uses it any more."""
    loop = _loop()
    entry = _CLIENTS.get(loop, {}).get(url) if loop is not None else None
    if entry is not None and entry[0] is client:
        entry[1] -= 1
        if entry[1] > 0:
            return
        assert loop is not None  # an entry is only found inside a loop
        del _CLIENTS[loop][url]
    with contextlib.suppress(Exception):
        await client.aclose()


def as_bytes(value: bytes | str) -> bytes:
    """A reply value as the bytes it is: our clients never set `decode_responses`, but
    redis-py types every reply as `bytes | str` whatever the client's settings."""
    if isinstance(value, str):
        raise TypeError("a casbah Redis client decoded a reply (decode_responses must stay off)")
    return value


def scored(reply: Iterable[Any]) -> list[tuple[bytes, float]]:
    """The (member, score) pairs of a `withscores=True` sorted-set reply, typed."""
    pairs: list[tuple[bytes, float]] = []
    for pair in reply:
        member, score = pair
        pairs.append((as_bytes(member), float(score)))
    return pairs


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
    return url


async def call(url: str, fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return await fn()
    except redis.exceptions.BusyLoadingError as exc:  # restarting, replaying its AOF
        raise Unavailable(f"Redis at {safe_url(url)} is loading its data: {exc}") from None
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
        raise Unavailable(f"Redis at {safe_url(url)} is unavailable: {exc}") from None
    except redis.exceptions.ResponseError as exc:
        if str(exc).startswith("OOM"):  # maxmemory reached with a noeviction policy
            raise ResourceExhausted(f"Redis at {safe_url(url)} is full: {exc}") from None
        raise Unavailable(f"Redis at {safe_url(url)} refused the command: {exc}") from None


def translated(method: Callable) -> Callable:
    """Decorator for methods of objects with a `url` attribute."""

    @functools.wraps(method)
    async def wrapper(self, *args, **kwargs):
        return await call(self.url, lambda: method(self, *args, **kwargs))

    return wrapper
