"""Issue 15, client side: an edge cache (`cache` of a local store in front of a `remote`,
under the spliced layer every instance has) moves large blobs to and from a splitting
upstream as chunks.

The upstream is a real casbah on loopback (`casbah_in_process`) whose interceptor counts
the blob bytes crossing the wire each way; the edge is the storage graph the server
builds for `examples/edge-cache.yaml`, over memory.  16 KiB average chunks, so a 4 MiB
file is ~250 chunks and a 64 KiB change touches a handful.
"""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from remote_helpers import (
    Faults,
    batch_read_response,
    build_node,
    casbah_in_process,
    memory_config,
    pieces,
    read_all,
    read_response,
)

from casbah.cdc import FastCdcParams, cut_buffer
from casbah.digest import Digest
from casbah.errors import DataLoss, DigestMismatch
from casbah.storage.base import Storage
from casbah.storage.spliced import FAST_CDC_2020, SplicedStorage
from casbah.storage.splitting import splice, split

SIZE = 4 << 20
CHANGED = 64 * 1024
PARAMS = FastCdcParams(16 * 1024)


def versions() -> tuple[tuple[Digest, bytes], tuple[Digest, bytes]]:
    rng = random.Random(15)
    first = rng.randbytes(SIZE)
    second = bytearray(first)
    second[SIZE // 2:SIZE // 2 + CHANGED] = rng.randbytes(CHANGED)
    return (Digest.of(first), first), (Digest.of(bytes(second)), bytes(second))


def upstream_config(chunking: bool = True):
    return memory_config(instances={"": {"asset-index": "memory",
                                         "chunking": {"avg-chunk-size": "16K", "enabled": chunking}}})


@dataclass
class Wire:
    """Blob bytes through the upstream's CAS and ByteStream, each way: what an edge sends
    and receives.  Also, optionally, corrupts what ByteStream.Read sends for one resource
    (a lying upstream: a fault a real casbah never commits, so injected here)."""

    sent_up: int = 0
    sent_down: int = 0
    corrupt: str | None = None
    faults: Faults = field(default_factory=Faults)

    def __post_init__(self) -> None:
        self.faults.rules.update(Write=self._write, BatchUpdateBlobs=self._batch_update, Read=self._read,
                                 BatchReadBlobs=self._batch_read)

    def reset(self) -> None:
        self.sent_up = self.sent_down = 0
        self.faults.calls.clear()

    @staticmethod
    def _kwargs(handler: grpc.RpcMethodHandler) -> dict[str, Any]:
        return {"request_deserializer": handler.request_deserializer,
                "response_serializer": handler.response_serializer}

    def _write(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def call(requests, context):
            async def counted() -> AsyncIterator[Any]:
                async for request in requests:
                    self.sent_up += len(request.data)
                    yield request

            return await handler.stream_unary(counted(), context)

        return grpc.stream_unary_rpc_method_handler(call, **self._kwargs(handler))

    def _batch_update(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def call(request, context):
            self.sent_up += sum(len(r.data) for r in request.requests)
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(call, **self._kwargs(handler))

    def _batch_read(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def call(request, context):
            response = await handler.unary_unary(request, context)
            self.sent_down += sum(len(r.data) for r in batch_read_response(response).responses)
            return response

        return grpc.unary_unary_rpc_method_handler(call, **self._kwargs(handler))

    def _read(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        wire = self
        assert inspect.iscoroutinefunction(handler.unary_stream)  # casbah writes with context.write

        class Writes:
            def __init__(self, context, corrupt: bool) -> None:
                self.context, self.corrupt = context, corrupt

            def __getattr__(self, name: str):
                return getattr(self.context, name)

            async def write(self, response) -> None:
                response = read_response(response)
                wire.sent_down += len(response.data)
                if self.corrupt and response.data:
                    response = response.__class__(data=bytes([response.data[0] ^ 1]) + response.data[1:])
                    self.corrupt = False
                await self.context.write(response)

        async def call(request, context) -> None:
            corrupt = self.corrupt is not None and self.corrupt in request.resource_name
            await handler.unary_stream(request, Writes(context, corrupt))

        return grpc.unary_stream_rpc_method_handler(call, **self._kwargs(handler))


def edge(address: str) -> SplicedStorage:
    """What the server builds for an edge: its spliced layer over a read-through cache."""
    inner = build_node({"kind": "cache", "fast": {"kind": "memory", "max-size": "1G"},
                        "slow": {"kind": "remote", "url": f"grpc://{address}"}})
    return SplicedStorage(inner, build_node({"kind": "memory", "verify": False}))


def fast_side(store: SplicedStorage) -> Storage:
    return store.inner.fast


async def put_upstream(address: str, *blobs: tuple[Digest, bytes]) -> None:
    direct = build_node({"kind": "remote", "url": f"grpc://{address}"})
    try:
        for digest, data in blobs:
            await direct.write(digest, pieces(data))
    finally:
        await direct.close()


def test_edge_write_splices_upstream_sending_only_missing_chunks() -> None:
    (v1, d1), (v2, d2) = versions()

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config()) as address:
            store = edge(address)
            try:
                await store.write(v1, pieces(d1))
                assert wire.faults.count("SpliceBlob") == 1 and wire.faults.count("Write") == 0
                assert SIZE <= wire.sent_up < SIZE * 1.05
                wire.reset()
                await store.write(v2, pieces(d2))
                assert wire.faults.count("SpliceBlob") == 1 and wire.faults.count("Write") == 0
                assert 0 < wire.sent_up <= SIZE * 0.05, wire.sent_up
                assert not await fast_side(store).find_missing([v2])  # write-through kept it locally
            finally:
                await store.close()
            other = edge(address)  # the upstream assembles v2 from chunks for anyone
            try:
                assert await read_all(other, v2) == d2
            finally:
                await other.close()

    asyncio.run(body())


def test_edge_refuses_a_wrong_upload_before_anything_reaches_the_upstream() -> None:
    (v1, d1), _ = versions()

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config()) as address:
            store = edge(address)
            try:
                with pytest.raises(DigestMismatch):
                    await store.write(v1, pieces(d1[:-1] + bytes([d1[-1] ^ 1])))
                assert wire.sent_up == 0 and wire.faults.count("SpliceBlob") == 0
                assert await store.find_missing([v1]) == [v1]
            finally:
                await store.close()

    asyncio.run(body())


def test_edge_read_fetches_only_the_chunks_it_lacks_and_keeps_them() -> None:
    (v1, d1), (v2, d2) = versions()

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config()) as address:
            await put_upstream(address, (v1, d1), (v2, d2))
            store = edge(address)
            try:
                assert await read_all(store, v1) == d1
                wire.reset()
                assert await read_all(store, v2) == d2
                assert wire.faults.count("SplitBlob") == 1
                assert 0 < wire.sent_down <= SIZE * 0.05, wire.sent_down
                # the split is recorded at the edge: v2 is served from local chunks alone
                wire.reset()
                assert await read_all(store, v2) == d2
                assert wire.sent_down == 0 and wire.faults.count("SplitBlob") == 0
                assert await store.record(v2) is not None
                assert await fast_side(store).find_missing([v2]) == [v2]  # kept as chunks, not whole
            finally:
                await store.close()

    asyncio.run(body())


def test_upstream_without_split_and_splice_gets_plain_bytestream() -> None:
    (v1, d1), _ = versions()

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config(chunking=False)) as address:
            store = edge(address)
            try:
                await store.write(v1, pieces(d1))
                assert wire.faults.count("Write") == 1 and wire.faults.count("SpliceBlob") == 0
                assert wire.sent_up >= SIZE  # the whole blob (zstd on the wire adds a little)
            finally:
                await store.close()
            wire.reset()
            fresh = edge(address)
            try:
                assert await read_all(fresh, v1) == d1
                assert wire.faults.count("SplitBlob") == 0 and wire.faults.count("Read") == 1
                assert wire.sent_down >= SIZE
            finally:
                await fresh.close()

    asyncio.run(body())


def test_a_corrupt_chunk_from_the_upstream_is_data_loss_and_nothing_is_stored() -> None:
    (v1, d1), (v2, d2) = versions()
    old = {c.digest for c in cut_buffer(d1, PARAMS, v1.function)}
    new = [c.digest for c in cut_buffer(d2, PARAMS, v2.function) if c.digest not in old]

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config()) as address:
            await put_upstream(address, (v1, d1), (v2, d2))
            store = edge(address)
            try:
                assert await read_all(store, v1) == d1
                wire.corrupt = new[0].hash
                with pytest.raises(DataLoss):
                    await read_all(store, v2)
                assert await store.record(v2) is None
                assert await fast_side(store).find_missing([new[0], v2]) == [new[0], v2]
            finally:
                await store.close()

    asyncio.run(body())


@pytest.mark.parametrize("chunking", [True, False], ids=["upstream-splices", "upstream-without-splice"])
def test_a_splice_at_the_edge_makes_the_blob_present_upstream(chunking: bool) -> None:
    """A client (Bazel with chunking) splices at the edge: its chunks went up as they were
    written, and the upstream gets the splice too (or, without SpliceBlob, the blob whole),
    so other edges and the upstream's own clients see the blob, not only this edge."""
    (v1, d1), _ = versions()
    cuts = cut_buffer(d1, PARAMS, v1.function)
    chunks = [c.digest for c in cuts]

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config(chunking)) as address:
            store = edge(address)
            direct = build_node({"kind": "remote", "url": f"grpc://{address}"})
            try:
                results = await store.write_many([(c.digest, d1[c.offset:c.offset + c.digest.size]) for c in cuts])
                assert not any(results)
                await splice(store, v1, chunks, FAST_CDC_2020)
                assert wire.faults.count("SpliceBlob") == (1 if chunking else 0)
                assert wire.faults.count("Write") == (0 if chunking else 1)
                assert await direct.find_missing([v1]) == []
                assert await read_all(direct, v1) == d1
            finally:
                await direct.close()
                await store.close()

    asyncio.run(body())


def test_split_blob_at_an_edge_lacking_the_blob_answers_the_upstreams_list() -> None:
    """A chunking client asks the edge for a split: the edge does not fetch the blob whole
    to cut it, it answers the upstream's list (and the client then reads the chunks)."""
    (v1, d1), _ = versions()

    async def body() -> None:
        wire = Wire()
        async with casbah_in_process(wire.faults, config=upstream_config()) as address:
            await put_upstream(address, (v1, d1))
            store = edge(address)
            try:
                wire.reset()
                chunks, _ = await split(store, v1, PARAMS)
                assert chunks == [c.digest for c in cut_buffer(d1, PARAMS, v1.function)]
                assert wire.sent_down == 0 and wire.faults.count("SplitBlob") == 1
            finally:
                await store.close()

    asyncio.run(body())
