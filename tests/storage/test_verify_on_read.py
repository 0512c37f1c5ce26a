"""Nothing unverified is passed on: the backends that read bytes they did not write
themselves (`remote`, `s3`, `redis`) verify them, and a mismatch is DataLoss.

The upstream of the `remote` cases is `lying_upstream.LyingUpstream`, a real gRPC
server that answers reads of chosen blobs with wrong bytes of the right length.
S3 and Redis are the real servers of tests/scale (moto, redis-server); their
stored bytes are corrupted behind the backend's back, through the store's own
client, as a bad disk or anyone with the bucket's keys could.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest
from lying_upstream import LyingUpstream
from remote_helpers import MiB, blob, build_node, read_all
from scale_factories import redis_node, s3_node

from casbah.digest import Digest
from casbah.errors import DataLoss
from casbah.storage.base import BlobsLost, Storage


def unwrap(storage: Storage) -> Storage:
    """The node under the loader's metrics wrapper."""
    return getattr(storage, "inner", storage)


async def received_before_failure(storage: Storage, digest: Digest, offset: int = 0, limit: int = 0) -> int:
    """Reads until the stream fails with DataLoss (the test fails if it does not); returns
    the bytes that reached the consumer before."""
    got = 0
    with pytest.raises(DataLoss) as caught:
        async for chunk in await storage.read(digest, offset, limit):
            got += len(chunk)
    assert str(digest) in str(caught.value)
    return got


@pytest.fixture
def liar() -> AsyncIterator[LyingUpstream]:
    with LyingUpstream() as upstream:
        yield upstream


# --------------------------------------------------------------------------- remote


def test_remote_batch_read_loses_only_the_wrong_blob(liar: LyingUpstream) -> None:
    good, good_data = blob(1000)
    bad, bad_data = blob(2000)
    liar.add(good, good_data)
    liar.add(bad, bad_data, lie=True)

    async def body() -> None:
        storage = build_node({"kind": "remote", "url": liar.url, "retries": 0})
        try:
            with pytest.raises(BlobsLost) as caught:
                await storage.read_many([good, bad])
            assert caught.value.found == {good: good_data}
            assert list(caught.value.lost) == [bad]
            message = str(caught.value.lost[bad])
            assert str(bad) in message and liar.address in message
            with pytest.raises(DataLoss):
                await storage.read_bytes(bad)
        finally:
            await storage.close()

    asyncio.run(body())


def test_remote_stream_never_yields_the_last_chunk_of_a_wrong_blob(liar: LyingUpstream) -> None:
    bad, bad_data = blob(3 * MiB + 5)
    good, good_data = blob(3 * MiB + 5)
    liar.add(bad, bad_data, lie=True)
    liar.add(good, good_data)

    async def body() -> None:
        storage = build_node({"kind": "remote", "url": liar.url, "retries": 0})
        try:
            got = await received_before_failure(storage, bad)
            assert got < bad.size  # the consumer never holds the complete (wrong) blob
            assert await read_all(storage, good) == good_data
            # A range cannot be verified alone: the whole blob is read, the range passed on.
            streamed = liar.streamed
            assert await read_all(storage, good, 10, 100) == good_data[10:110]
            assert liar.streamed - streamed == good.size
            assert await read_all(storage, good, MiB + 7) == good_data[MiB + 7 :]
            await received_before_failure(storage, bad, 10, 100)
            small, small_data = blob(100)
            liar.add(small, small_data, lie=True)
            with pytest.raises(DataLoss):  # one message: the failure comes before any data
                await storage.read(small)
        finally:
            await storage.close()

    asyncio.run(body())


def test_remote_with_verify_false_passes_bytes_through(liar: LyingUpstream) -> None:
    """ActionCache-style nodes are keyed by something other than the bytes' hash."""
    bad, bad_data = blob(500)
    liar.add(bad, bad_data, lie=True)

    async def body() -> None:
        storage = build_node({"kind": "remote", "url": liar.url, "retries": 0, "verify": False})
        try:
            assert await read_all(storage, bad) == liar.served(bad.hash, bad.size)
        finally:
            await storage.close()

    asyncio.run(body())


def test_cache_in_front_of_a_lying_remote_serves_and_keeps_nothing(liar: LyingUpstream) -> None:
    small, small_data = blob(1000)
    large, large_data = blob(2 * MiB + 1)
    good, good_data = blob(700)
    for digest, data in ((small, small_data), (large, large_data)):
        liar.add(digest, data, lie=True)
    liar.add(good, good_data)

    async def body() -> None:
        storage = build_node({"kind": "cache", "fast": {"kind": "memory"},
                              "slow": {"kind": "remote", "url": liar.url, "retries": 0}})
        cache = unwrap(storage)
        try:
            with pytest.raises(BlobsLost) as caught:
                await storage.read_many([small, good])
            assert set(caught.value.lost) == {small} and caught.value.found == {good: good_data}
            assert await received_before_failure(storage, large) < large.size
            await cache.settle()
            assert await cache.fast.find_missing([small, large, good]) == [small, large]
        finally:
            await storage.close()

    asyncio.run(body())


def test_replicated_reads_past_a_lying_replica(liar: LyingUpstream) -> None:
    small, small_data = blob(1000)
    large, large_data = blob(2 * MiB + 1)
    for digest, data in ((small, small_data), (large, large_data)):
        liar.add(digest, data, lie=True)

    async def body() -> None:
        storage = build_node({"kind": "replicated", "quorum": 1, "replicas": [
            {"kind": "remote", "url": liar.url, "retries": 0}, {"kind": "memory"}]})
        honest = unwrap(unwrap(storage).replicas[1])
        try:
            await honest.write_bytes(small, small_data)
            await honest.write_bytes(large, large_data)
            assert await storage.read_many([small]) == {small: small_data}
            assert await read_all(storage, small) == small_data  # DataLoss at open: the next replica
            # A stream that fails at its end cannot be switched; the retry goes elsewhere.
            assert await received_before_failure(storage, large) < large.size
            assert await read_all(storage, large) == large_data
        finally:
            await storage.close()

    asyncio.run(body())


# --------------------------------------------------------------------------- s3, redis


def _inverted(data: bytes) -> bytes:
    return bytes(255 - b for b in data[:64]) + data[64:]


def test_s3_verifies_what_it_reads() -> None:
    async def body() -> None:
        storage = build_node(s3_node(**{"multipart-threshold": "8M"}))
        s3 = unwrap(storage)
        bad, bad_data = blob(2 * MiB + 3)
        good, good_data = blob(300)
        try:
            await storage.write_bytes(bad, bad_data)
            await storage.write_bytes(good, good_data)
            assert await read_all(storage, bad) == bad_data
            s3.client.put_object(Bucket=s3.bucket, Key=s3._key(bad), Body=_inverted(bad_data))
            assert await received_before_failure(storage, bad) < bad.size
            await received_before_failure(storage, bad, MiB, 10)
            with pytest.raises(DataLoss):
                await storage.read_bytes(bad)
            with pytest.raises(BlobsLost) as caught:
                await storage.read_many([good, bad])
            assert caught.value.found == {good: good_data} and list(caught.value.lost) == [bad]
        finally:
            await storage.delete([bad, good])
            await storage.close()

    asyncio.run(body())


def test_redis_verifies_what_it_reads() -> None:
    async def body() -> None:
        storage = build_node(redis_node())
        unverified = build_node(redis_node(verify=False))
        redis = unwrap(storage)
        bad, bad_data = blob(5000)
        good, good_data = blob(10)
        try:
            await storage.write_many([(bad, bad_data), (good, good_data)])
            await redis.redis.set(redis._key(bad), _inverted(bad_data))
            with pytest.raises(DataLoss) as caught:
                await storage.read(bad)
            assert str(bad) in str(caught.value) and "redis" in str(caught.value)
            with pytest.raises(DataLoss):
                await storage.read(bad, 10, 10)
            with pytest.raises(DataLoss):
                await storage.read_bytes(bad)
            with pytest.raises(BlobsLost) as lost:
                await storage.read_many([bad, good])
            assert lost.value.found == {good: good_data} and list(lost.value.lost) == [bad]
            # verify: false (ActionCache entries, keyed by the action digest) reads as stored.
            key = os.urandom(8).hex()
            plain = unwrap(unverified)
            await plain.redis.set(plain._key(bad), key.encode())
            assert await unverified.read_bytes(bad) == key.encode()
        finally:
            await storage.delete([bad, good])
            await unverified.delete([bad])
            await storage.close()
            await unverified.close()

    asyncio.run(body())
