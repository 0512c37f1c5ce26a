"""The soak job's load and its ledger: Bazel-shaped calls, and every write the server acknowledged.

Blob contents are a function of their index (`content`), so the ledger keeps only
digests and the check after a restart regenerates nothing: it reads each blob back and
hashes it.  A write is acknowledged only by an OK answer (an OK per-blob status for a
batch); a write the server refused, or that died with the server, is not in the ledger
and may be lost.  New distinct bytes are rate-limited so a long run fits its disk.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import random
import time
import uuid
from dataclasses import dataclass, field

import grpc

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MiB = 1 << 20
LARGE = 6 * MiB
#: (operation, weight): roughly what a Bazel build with a remote cache sends.
MIX = [("fmb", 30), ("batch_update", 14), ("batch_read", 14), ("bs_write_small", 5), ("bs_write_large", 3),
       ("bs_read_small", 10), ("bs_read_large", 4), ("ac_update", 5), ("ac_get", 8), ("asset_push", 3),
       ("asset_fetch", 4)]
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def content(index: int) -> bytes:
    """Blob `index`: every 40th is large (ByteStream), the rest 100 B .. 60 KB."""
    size = LARGE + index % 1000 if index % 40 == 0 else 100 + (index * 7919) % 60_000
    block = hashlib.sha256(f"soak:{index}".encode()).digest() * 64
    return (block * (size // len(block) + 1))[:size]


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


@dataclass
class Ledger:
    """What the server acknowledged: blobs by index, ActionCache entries, asset URIs."""

    blobs: dict[int, re_pb2.Digest] = field(default_factory=dict)
    actions: dict[str, tuple[re_pb2.Digest, bytes]] = field(default_factory=dict)
    assets: dict[str, re_pb2.Digest] = field(default_factory=dict)

    def small(self) -> list[int]:
        return [i for i in self.blobs if i % 40]

    def large(self) -> list[int]:
        return [i for i in self.blobs if i % 40 == 0]


@dataclass
class Stats:
    """Outcomes per operation, split by whether the server was up (restarts excused)."""

    outcomes: collections.Counter = field(default_factory=collections.Counter)
    excused: collections.Counter = field(default_factory=collections.Counter)
    cancelled_by_us: int = 0

    def record(self, op: str, code: grpc.StatusCode, restarting: bool) -> None:
        (self.excused if restarting else self.outcomes)[(op, code.name)] += 1


class Load:
    def __init__(self, address: str, ledger: Ledger, stats: Stats, write_rate: float, seed: int = 1) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=OPTIONS)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bs = bs_grpc.ByteStreamStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.push = ra_grpc.PushStub(self.channel)
        self.fetch = ra_grpc.FetchStub(self.channel)
        self.ledger = ledger
        self.stats = stats
        self.rng = random.Random(seed)
        self.running = asyncio.Event()
        self.running.set()
        self.restarting = False
        #: New distinct bytes allowed per second, half for small and half for large blobs
        #: (token buckets: a large blob waits until its bucket holds its size).
        self.write_rate = write_rate
        self._budget = {False: 0.0, True: 0.0}
        self._budget_at = time.monotonic()
        self._next = {False: 1, True: 40}

    def _new_index(self, large: bool) -> int | None:
        """A fresh blob index, or None when the write-rate budget is spent (re-upload instead)."""
        now = time.monotonic()
        for kind in (False, True):
            self._budget[kind] = min(self._budget[kind] + (now - self._budget_at) * self.write_rate / 2, 2 * LARGE)
        self._budget_at = now
        index = self._next[large]
        if len(content(index)) > self._budget[large]:
            return None
        self._budget[large] -= len(content(index))
        step = 40 if large else (2 if (index + 1) % 40 == 0 else 1)
        self._next[large] = index + step
        return index

    def _pick(self, large: bool, new_share: float) -> int | None:
        known = self.ledger.large() if large else self.ledger.small()
        if not known or self.rng.random() < new_share:
            fresh = self._new_index(large)
            if fresh is not None:
                return fresh
        return self.rng.choice(known) if known else None

    async def worker(self, until: float) -> None:
        ops, weights = zip(*MIX, strict=True)
        while time.monotonic() < until:
            await self.running.wait()
            op = self.rng.choices(ops, weights)[0]
            restarting = self.restarting
            try:
                await getattr(self, op)()
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            except _Cancelled:
                self.stats.cancelled_by_us += 1
                continue
            except _Skipped:
                await asyncio.sleep(0.01)
                continue
            self.stats.record(op, code, restarting or self.restarting)
            if code is grpc.StatusCode.UNAVAILABLE:
                await asyncio.sleep(0.2)

    # -- operations ------------------------------------------------------------------

    async def fmb(self) -> None:
        known = list(self.ledger.blobs.values())
        digests = self.rng.sample(known, min(len(known), 150))
        digests += [digest_of(str(uuid.uuid4()).encode()) for _ in range(20)]
        await self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests), timeout=30)

    async def batch_update(self) -> None:
        indexes = {i for i in (self._pick(False, 0.5) for _ in range(self.rng.randint(3, 15))) if i is not None}
        if not indexes:
            raise _Skipped
        requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(content(i)), data=content(i))
                    for i in indexes]
        response = await self.cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests), timeout=30)
        for index, answer in zip(indexes, response.responses, strict=True):
            if answer.status.code == 0:
                self.ledger.blobs[index] = answer.digest
            else:
                self.stats.record("batch_update_blob", grpc.StatusCode(_code(answer.status.code)), False)

    async def batch_read(self) -> None:
        known = self.ledger.small()
        if not known:
            raise _Skipped
        digests = [self.ledger.blobs[i] for i in self.rng.sample(known, min(len(known), 15))]
        await self.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests), timeout=30)

    async def _bs_write(self, large: bool) -> None:
        index = self._pick(large, 0.6)
        if index is None:
            raise _Skipped
        data = content(index)
        digest = digest_of(data)
        name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
        cancel = large and self.rng.random() < 0.2
        step = MiB if large else 16 << 10

        async def requests():
            for offset in range(0, len(data), step):
                if cancel and offset >= 2 * MiB:
                    call.cancel()  # a client that goes away mid-upload
                    return
                yield bs_pb2.WriteRequest(resource_name=name if offset == 0 else "", write_offset=offset,
                                          data=data[offset:offset + step], finish_write=offset + step >= len(data))

        call = self.bs.Write(requests(), timeout=60)
        try:
            await call
        except asyncio.CancelledError:
            if cancel and call.cancelled():
                raise _Cancelled from None
            raise
        self.ledger.blobs[index] = digest

    async def bs_write_small(self) -> None:
        await self._bs_write(False)

    async def bs_write_large(self) -> None:
        await self._bs_write(True)

    async def _bs_read(self, large: bool) -> None:
        known = self.ledger.large() if large else self.ledger.small()
        if not known:
            raise _Skipped
        digest = self.ledger.blobs[self.rng.choice(known)]
        call = self.bs.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}"), timeout=60)
        if large and self.rng.random() < 0.25:  # a client that goes away after the first message
            await call.read()
            call.cancel()
            raise _Cancelled
        async for _ in call:
            pass

    async def bs_read_small(self) -> None:
        await self._bs_read(False)

    async def bs_read_large(self) -> None:
        await self._bs_read(True)

    async def ac_update(self) -> None:
        known = self.ledger.small()
        if not known:
            raise _Skipped
        output = self.ledger.blobs[self.rng.choice(known)]
        action = digest_of(str(uuid.uuid4()).encode())
        result = re_pb2.ActionResult(exit_code=0, output_files=[re_pb2.OutputFile(path="out/a.o", digest=output)])
        await self.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action,
                                                                          action_result=result), timeout=30)
        self.ledger.actions[action.hash] = (action, result.SerializeToString(deterministic=True))

    async def ac_get(self) -> None:
        if not self.ledger.actions:
            raise _Skipped
        action, _ = self.ledger.actions[self.rng.choice(list(self.ledger.actions))]
        await self.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=30)

    async def asset_push(self) -> None:
        known = self.ledger.small()
        if not known:
            raise _Skipped
        digest = self.ledger.blobs[self.rng.choice(known)]
        uri = f"https://example.com/soak/{uuid.uuid4()}.tar.gz"
        await self.push.PushBlob(ra_pb2.PushBlobRequest(uris=[uri], blob_digest=digest), timeout=30)
        self.ledger.assets[uri] = digest

    async def asset_fetch(self) -> None:
        if not self.ledger.assets:
            raise _Skipped
        uri = self.rng.choice(list(self.ledger.assets))
        await self.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri]), timeout=30)

    async def close(self) -> None:
        await self.channel.close()


class _Cancelled(Exception):
    """The load cancelled this call on purpose (a client going away mid-stream)."""


class _Skipped(Exception):
    """Nothing to do yet for this operation (no such content acknowledged, no write budget)."""


def _code(number: int) -> tuple:
    return next(c.value for c in grpc.StatusCode if c.value[0] == number)


async def verify(address: str, ledger: Ledger) -> dict[str, int]:
    """Read back everything acknowledged: blobs (hashed), ActionCache entries, assets."""
    lost = collections.Counter()
    async with grpc.aio.insecure_channel(address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        bs = bs_grpc.ByteStreamStub(channel)
        blobs = dict(ledger.blobs)
        digests = list(blobs.values())
        for start in range(0, len(digests), 1000):
            response = await cas.FindMissingBlobs(
                re_pb2.FindMissingBlobsRequest(blob_digests=digests[start:start + 1000]), timeout=60)
            lost["blobs missing"] += len(response.missing_blob_digests)
        small = [d for i, d in blobs.items() if i % 40]
        for start in range(0, len(small), 20):
            response = await cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=small[start:start + 20]),
                                                timeout=60)
            for answer in response.responses:
                if answer.status.code != 0 or hashlib.sha256(answer.data).hexdigest() != answer.digest.hash:
                    lost["blobs unreadable or corrupt"] += 1
        for i, digest in blobs.items():
            if i % 40 == 0:
                h = hashlib.sha256()
                try:
                    async for message in bs.Read(bs_pb2.ReadRequest(
                            resource_name=f"blobs/{digest.hash}/{digest.size_bytes}"), timeout=60):
                        h.update(message.data)
                except grpc.aio.AioRpcError:
                    lost["blobs unreadable or corrupt"] += 1
                    continue
                if h.hexdigest() != digest.hash:
                    lost["blobs unreadable or corrupt"] += 1
        ac = re_grpc.ActionCacheStub(channel)
        for action, expected in list(ledger.actions.values()):
            try:
                got = await ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=30)
            except grpc.aio.AioRpcError:
                lost["action results"] += 1
                continue
            if got.SerializeToString(deterministic=True) != expected:
                lost["action results"] += 1
        fetch = ra_grpc.FetchStub(channel)
        for uri, digest in list(ledger.assets.items()):
            got = await fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri]), timeout=30)
            if got.status.code != 0 or got.blob_digest != digest:
                lost["assets"] += 1
    return dict(lost)
