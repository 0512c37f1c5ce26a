"""The ActionCache contract: what every ActionCache kind promises GetActionResult and
UpdateActionResult, tested on each kind of `family_factories.AC_KINDS` (memory, disk and a
named storage node, Redis with and without a ttl, PostgreSQL, remote to a real casbah).

In process, through `build_action_cache` (the server's loader): the backend is the unit
under test; the services are tested over gRPC in tests/server/test_action_cache.py.
Entries are real serialized ActionResults (a `remote` upstream parses them) that name no
CAS content, so an upstream's completeness check never changes a result.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from family_factories import AC_KINDS, AcKind

from casbah.digest import Digest, DigestFunction
from casbah.errors import ActionResultNotFound, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.storage.action_cache import ActionCache

Opener = Callable[[], ActionCache]


@pytest.fixture(params=AC_KINDS, ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> AcKind:
    return request.param


@pytest.fixture
def run_on(kind: AcKind, tmp_path: Path) -> Callable[[Callable[[Opener], Awaitable[None]]], None]:
    """`run_on(body)`: `body(open_cache)` in a fresh event loop on a fresh store of this kind;
    every cache it opened is closed afterwards."""

    def run(body: Callable[[Opener], Awaitable[None]]) -> None:
        opener = kind.make(tmp_path, uuid.uuid4().hex[:12])
        opened: list[ActionCache] = []

        def open_cache() -> ActionCache:
            cache = opener()
            opened.append(cache)
            return cache

        async def main() -> None:
            try:
                await body(open_cache)
            finally:
                for cache in {id(c): c for c in opened}.values():
                    await cache.close()

        asyncio.run(main())

    return run


def action(function: DigestFunction = DigestFunction.SHA256) -> Digest:
    return Digest.of(os.urandom(40), function)


def result(exit_code: int = 0, stdout: bytes = b"") -> bytes:
    return re_pb2.ActionResult(exit_code=exit_code, stdout_raw=stdout).SerializeToString(deterministic=True)


def test_miss_raises_action_result_not_found(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        missing = action()
        with pytest.raises(ActionResultNotFound) as info:
            await cache.get(missing)
        assert isinstance(info.value, NotFound)  # the servicer answers NOT_FOUND by the one table
        assert missing.hash in str(info.value)

    run_on(body)


def test_get_after_put_returns_the_bytes_and_keys_are_separate(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a, b = action(), action()
        await cache.put(a, result(1, b"a"))
        await cache.put(b, result(2, b"b"))
        assert await cache.get(a) == result(1, b"a")
        assert await cache.get(b) == result(2, b"b")
        # Same hash and size, another action: a miss.
        other = Digest(a.hash[:-1] + ("0" if a.hash[-1] != "0" else "1"), a.size)
        with pytest.raises(ActionResultNotFound):
            await cache.get(other)
        with pytest.raises(ActionResultNotFound):
            await cache.get(Digest(a.hash, a.size + 1))

    run_on(body)


def test_overwrite_replaces_the_entry(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a = action()
        await cache.put(a, result(1, b"first"))
        await cache.put(a, result(0, b"second, longer than the first"))
        assert await cache.get(a) == result(0, b"second, longer than the first")
        await cache.put(a, result(3))  # and shorter again
        assert await cache.get(a) == result(3)

    run_on(body)


def test_empty_action_result_is_a_hit(run_on) -> None:
    """A default ActionResult serializes to b"": it is an entry, not a miss."""

    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a = action()
        await cache.put(a, b"")
        assert await cache.get(a) == b""

    run_on(body)


def test_digest_functions_are_separate_keys(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        sha = action()
        same_hex = Digest(sha.hash, sha.size, DigestFunction.BLAKE3)
        await cache.put(sha, result(1))
        with pytest.raises(ActionResultNotFound):
            await cache.get(same_hex)
        await cache.put(same_hex, result(2))
        assert await cache.get(sha) == result(1)
        assert await cache.get(same_hex) == result(2)
        blake = action(DigestFunction.BLAKE3)
        await cache.put(blake, result(5))
        assert await cache.get(blake) == result(5)

    run_on(body)


def test_large_entry_round_trips(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a = action()
        big = result(0, os.urandom(512 * 1024))
        await cache.put(a, big)
        assert await cache.get(a) == big

    run_on(body)


def test_concurrent_writers_leave_one_whole_entry(run_on) -> None:
    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a = action()
        values = [result(i, os.urandom(1000 + i)) for i in range(8)]
        await asyncio.gather(*(cache.put(a, v) for v in values), *(cache.put(action(), v) for v in values))
        assert await cache.get(a) in values

    run_on(body)


def test_entries_survive_a_reopen(kind: AcKind, run_on) -> None:
    if not kind.persistent:
        pytest.skip(f"{kind.name}: entries live as long as the process")

    async def body(open_cache: Opener) -> None:
        first = open_cache()
        a = action()
        await first.put(a, result(1))
        await first.close()
        assert await open_cache().get(a) == result(1)

    run_on(body)


def test_another_server_sees_the_entries(kind: AcKind, run_on) -> None:
    """What one server writes, another server on the same backend reads (and overwrites) at once."""
    if not kind.shared:
        pytest.skip(f"{kind.name}: one process owns the store")

    async def body(open_cache: Opener) -> None:
        first, second = open_cache(), open_cache()
        a = action()
        await first.put(a, result(1))
        assert await second.get(a) == result(1)
        await second.put(a, result(2))
        assert await first.get(a) == result(2)

    run_on(body)


def test_entries_expire_after_the_ttl(kind: AcKind, run_on) -> None:
    if kind.ttl is None:
        pytest.skip(f"{kind.name}: entries do not expire (kept until evicted)")

    async def body(open_cache: Opener) -> None:
        cache = open_cache()
        a = action()
        await cache.put(a, result(1))
        written = time.monotonic()
        assert await cache.get(a) == result(1)
        await asyncio.sleep(kind.ttl + 0.3)
        with pytest.raises(ActionResultNotFound):
            await cache.get(a)
        # A rewrite starts a new lifetime.
        await cache.put(a, result(2))
        assert await cache.get(a) == result(2)
        assert time.monotonic() - written >= kind.ttl

    run_on(body)


def test_contract_covers_every_kind() -> None:
    """Every ActionCache kind the registry knows runs the contract (plus a storage-backed one)."""
    from casbah.storage.action_cache import ACTION_CACHE

    ACTION_CACHE.load_all()
    names = [kind.name for kind in AC_KINDS]
    assert len(names) == len(set(names))
    assert set(ACTION_CACHE.kinds) <= set(names)
    assert {"memory", "disk", "named_disk"} <= set(names)
    assert any(kind.ttl for kind in AC_KINDS)
