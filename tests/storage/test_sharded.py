"""The composing kinds' own promises, beyond the storage contract they all pass:
sharded placement (stable, balanced, weighted, minimal movement), replicated
repair and quorum, cache fill and forwarding, existence-cache hiding.

Everything is in process over memory stores: these are properties of the
decorators, not of any protocol.  `Counting` is a real decorator that counts what
reaches the store under it.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import pytest
from remote_helpers import Counting, MiB, blob, build_node, pieces, read_all

from casbah.config import ConfigError
from casbah.digest import Digest
from casbah.errors import BlobNotFound, ResourceExhausted, Unavailable
from casbah.storage.existence_cache import ExistenceCacheStorage
from casbah.storage.loader import StorageLoader, load_builtin_kinds
from casbah.storage.memory import MemoryStorage
from casbah.storage.read_through import ReadThroughStorage
from casbah.storage.replicated import ReplicatedStorage
from casbah.storage.sharded import ShardedStorage

N = 100_000


@pytest.fixture(scope="module")
def digests() -> list[Digest]:
    return [Digest(os.urandom(32).hex(), 1 + i % 5000) for i in range(N)]


def sharded(keys: list[str], weights: list[float] | None = None) -> ShardedStorage:
    weights = weights or [1.0] * len(keys)
    return ShardedStorage([(k, MemoryStorage(), w) for k, w in zip(keys, weights, strict=True)])


def placement(storage: ShardedStorage, keys: list[str], digests: list[Digest]) -> list[str]:
    """The key of the shard each digest goes to."""
    return [keys[storage.part_index(d)] for d in digests]


# --------------------------------------------------------------------------- sharded


def test_placement_is_stable_across_instances_and_shard_order(digests: list[Digest]) -> None:
    keys = ["east", "west", "north"]
    first = placement(sharded(keys), keys, digests)
    assert placement(sharded(keys), keys, digests) == first  # another instance (another process: same hash)
    for order in (["north", "east", "west"], ["west", "north", "east"]):
        assert placement(sharded(order), order, digests) == first
    # The same through config: shards-from URLs are the keys, in any order.
    load_builtin_kinds()
    urls = ["grpc://10.0.0.1:1", "grpc://10.0.0.2:1", "grpc://10.0.0.3:1"]

    def from_config(listed: list[str]) -> list[str]:
        node = StorageLoader({}).build({"kind": "sharded", "shards-from": " , ".join(listed)}, "pool")
        return placement(node.inner, listed, digests[:5000])  # type: ignore[attr-defined]

    assert from_config(urls) == from_config(urls[::-1]) == from_config([urls[1], urls[2], urls[0]])


def test_equal_weights_balance_within_5_percent(digests: list[Digest]) -> None:
    keys = ["a", "b", "c"]
    counts = Counter(placement(sharded(keys), keys, digests))
    for key in keys:
        assert abs(counts[key] - N / 3) / (N / 3) < 0.05, counts


def test_weights_are_respected(digests: list[Digest]) -> None:
    keys = ["big", "small"]
    counts = Counter(placement(sharded(keys, [2.0, 1.0]), keys, digests))
    assert abs(counts["big"] / N - 2 / 3) < 0.05 * 2 / 3, counts
    assert abs(counts["small"] / N - 1 / 3) < 0.05 * 1 / 3, counts


def test_adding_a_shard_moves_a_quarter_and_only_to_it(digests: list[Digest]) -> None:
    three = ["a", "b", "c"]
    four = ["a", "b", "c", "d"]
    before = placement(sharded(three), three, digests)
    after = placement(sharded(four), four, digests)
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == "d" for _, new in moved)
    assert 0.22 < len(moved) / N < 0.28, len(moved) / N


def test_sharded_operations_land_on_the_placed_shard() -> None:
    async def body() -> None:
        keys = ["a", "b", "c"]
        storage = sharded(keys)
        blobs = [blob(100 + i) for i in range(60)]
        big_digest, big = blob(2 * MiB)
        assert await storage.write_many(blobs) == [None] * 60
        await storage.write(big_digest, pieces(big))
        for digest, _ in [*blobs, (big_digest, big)]:
            owner = storage.part_index(digest)
            for i, shard in enumerate(storage.shards):
                assert (await shard.find_missing([digest]) == []) == (i == owner)
        assert {storage.part_index(d) for d, _ in blobs} == {0, 1, 2}
        absent = blob(5)[0]
        assert await storage.find_missing([absent, *(d for d, _ in blobs)]) == [absent]
        assert await storage.read_many([d for d, _ in blobs]) == dict(blobs)
        assert await read_all(storage, big_digest, 10, 100) == big[10:110]

    asyncio.run(body())


def test_sharded_config_errors_are_clear() -> None:
    load_builtin_kinds()
    with pytest.raises(ConfigError, match="shards-from"):
        StorageLoader({}).build({"kind": "sharded", "shards-from": " , "}, "pool")
    with pytest.raises(ConfigError, match="unique"):
        StorageLoader({}).build({"kind": "sharded", "shards-from": "grpc://h:1,grpc://h:1"}, "pool")


# --------------------------------------------------------------------------- replicated


def test_replicated_read_repairs_a_replica_that_lost_a_blob() -> None:
    async def body() -> None:
        loader_named = {"r1": {"kind": "memory"}, "r2": {"kind": "memory"}}
        load_builtin_kinds()
        loader = StorageLoader(loader_named)
        storage = loader.build({"kind": "replicated", "replicas": ["r1", "r2"]}, "replicated")
        r1, r2 = loader.build("r1", "x"), loader.build("r2", "x")
        small_digest, small = blob(1000)
        big_digest, big = blob(3 * MiB)
        assert await storage.write_many([(small_digest, small)]) == [None]
        await storage.write(big_digest, pieces(big))
        for replica in (r1, r2):
            assert await replica.find_missing([small_digest, big_digest]) == []

        # Lost from the first replica: still present, and a read puts it back.
        assert await r1.delete([small_digest, big_digest]) == 2
        assert await storage.find_missing([small_digest, big_digest]) == []
        assert await read_all(storage, big_digest) == big
        assert await storage.read_bytes(small_digest) == small
        assert await r1.find_missing([small_digest, big_digest]) == []
        assert await r1.read_bytes(big_digest) == big

        # Lost from the second: still present and readable (from the first replica).
        await r2.delete([small_digest])
        assert await storage.find_missing([small_digest]) == []
        assert await storage.read_many([small_digest]) == {small_digest: small}
        await storage.close()

    asyncio.run(body())


def test_replicated_quorum_failure_is_an_error() -> None:
    """The second replica is a memory store too small for the blob: a real refusal
    (RESOURCE_EXHAUSTED).  With quorum 2 the write fails; with quorum 1 it succeeds."""

    async def body() -> None:
        digest, data = blob(64 * 1024)
        strict = ReplicatedStorage([MemoryStorage(), MemoryStorage(max_bytes=1024)], quorum=2)
        with pytest.raises(Unavailable, match="quorum is 2"):
            await strict.write(digest, pieces(data, 8192))
        results = await strict.write_many([(digest, data)])
        assert isinstance(results[0], Unavailable)

        lenient = ReplicatedStorage([MemoryStorage(), MemoryStorage(max_bytes=1024)], quorum=1)
        await lenient.write(digest, pieces(data, 8192))
        assert await lenient.write_many([(digest, data)]) == [None]
        assert await read_all(lenient, digest) == data
        with pytest.raises(ResourceExhausted):
            await lenient.replicas[1].write_bytes(digest, data)

    asyncio.run(body())


def test_replicated_find_missing_fails_when_no_replica_answers() -> None:
    async def body() -> None:
        dead = build_node({"kind": "remote", "url": "grpc://127.0.0.1:9", "retries": 0, "request-timeout": 2})
        alive = MemoryStorage()
        digest, data = blob(10)
        await alive.write_bytes(digest, data)
        assert await ReplicatedStorage([dead, alive], quorum=1).find_missing([digest]) == []
        with pytest.raises(Unavailable):
            await ReplicatedStorage([dead], quorum=1).find_missing([digest])
        await dead.close()

    asyncio.run(body())


# --------------------------------------------------------------------------- cache


def test_cache_read_fills_the_fast_store_and_later_reads_stay_there() -> None:
    async def body() -> None:
        fast, slow = Counting(MemoryStorage()), Counting(MemoryStorage())
        cache = ReadThroughStorage(fast, slow)
        big_digest, big = blob(3 * MiB + 7)
        small_digest, small = blob(500)
        await slow.inner.write(big_digest, pieces(big))
        await slow.inner.write_bytes(small_digest, small)

        assert await read_all(cache, big_digest, 5, 10) == big[5:15]  # a partial read does not fill
        assert await fast.inner.find_missing([big_digest]) == [big_digest]
        assert await read_all(cache, big_digest) == big
        assert await cache.read_many([small_digest]) == {small_digest: small}
        await cache.settle()  # small blobs are copied in the background
        assert await fast.inner.find_missing([big_digest, small_digest]) == []

        slow.calls.clear()
        assert await read_all(cache, big_digest) == big
        assert await cache.read_bytes(small_digest) == small
        assert await cache.find_missing([big_digest, small_digest]) == []
        assert slow.calls == {}  # served by the fast store alone

        # An abandoned read leaves nothing half-written in the fast store.
        other_digest, other = blob(3 * MiB)
        await slow.inner.write(other_digest, pieces(other))
        stream = await cache.read(other_digest)
        await anext(stream)
        await stream.aclose()  # type: ignore[attr-defined]
        assert await fast.inner.find_missing([other_digest]) == [other_digest]
        with pytest.raises(BlobNotFound):
            await cache.read(blob(5)[0])

    asyncio.run(body())


def test_cache_write_modes() -> None:
    async def body() -> None:
        for mode, in_fast in (("write-through", True), ("write-slow", False)):
            fast, slow = MemoryStorage(), MemoryStorage()
            cache = ReadThroughStorage(fast, slow, mode)
            big_digest, big = blob(2 * MiB)
            small_digest, small = blob(100)
            await cache.write(big_digest, pieces(big))
            assert await cache.write_many([(small_digest, small)]) == [None]
            await cache.settle()
            assert await slow.find_missing([big_digest, small_digest]) == []
            assert (await fast.find_missing([big_digest, small_digest]) == []) == in_fast, mode
            assert await read_all(cache, big_digest) == big
            assert await fast.find_missing([big_digest]) == []  # filled by the read at the latest

    asyncio.run(body())


def test_cache_find_missing_asks_the_slow_store_only_for_what_the_fast_one_lacks() -> None:
    async def body() -> None:
        fast, slow = MemoryStorage(), Counting(MemoryStorage())
        cache = ReadThroughStorage(fast, slow)
        (a, a_data), (b, b_data), (c, c_data), (d, _) = (blob(n) for n in (10, 20, 30, 40))
        await fast.write_many([(a, a_data), (b, b_data)])
        await slow.inner.write_bytes(c, c_data)
        assert await cache.find_missing([a, b, c, d]) == [d]
        assert slow.asked == [[c, d]]
        assert await cache.find_missing([b, a]) == []
        assert slow.asked == [[c, d]]  # not asked at all

    asyncio.run(body())


def test_cache_fast_store_failure_does_not_fail_reads_or_writes() -> None:
    """A fast store that refuses (full: a 1 KiB memory store) only loses the copy."""

    async def body() -> None:
        fast, slow = MemoryStorage(max_bytes=1024), MemoryStorage()
        cache = ReadThroughStorage(fast, slow)
        digest, data = blob(2 * MiB)
        await cache.write(digest, pieces(data))
        assert await read_all(cache, digest) == data
        assert await cache.write_many([(d, x) for d, x in [blob(4096)]]) == [None]
        assert await slow.find_missing([digest]) == []

    asyncio.run(body())


# --------------------------------------------------------------------------- existence-cache


def test_existence_cache_hides_repeated_find_missing_within_ttl() -> None:
    async def body() -> None:
        backend = Counting(MemoryStorage())
        cache = ExistenceCacheStorage(backend, ttl=0.5)
        (a, a_data), (b, b_data) = blob(10), blob(20)
        absent = blob(30)[0]
        await backend.inner.write_bytes(a, a_data)
        assert await cache.find_missing([a, absent]) == [absent]
        assert await cache.find_missing([a, absent]) == [absent]
        assert backend.asked == [[a, absent], [absent]]  # presence remembered, absence never
        assert await cache.find_missing([a]) == []
        assert len(backend.asked) == 2

        await cache.write_bytes(b, b_data)  # a write is remembered too
        assert await cache.find_missing([b]) == []
        assert len(backend.asked) == 2

        await asyncio.sleep(0.6)  # past ttl: asked again
        assert await cache.find_missing([a, b]) == []
        assert backend.asked[-1] == [a, b]

        # Evicted behind the cache's back: a read that misses makes it ask again.
        await backend.inner.delete([a])
        assert await cache.find_missing([a]) == []  # within ttl: still vouched for...
        with pytest.raises(BlobNotFound):
            await cache.read(a)
        assert await cache.find_missing([a]) == [a]  # ...until a read found it gone
        assert cache.hits >= 3

    asyncio.run(body())
