"""The jobs load-generator workers run: one class per kind of traffic.

Jobs are small picklable descriptions (a dataset seed, an index range): each worker
rebuilds its own data and requests in `prepare`, so the parent never ships megabytes
through a pipe, and caches them in its `WorkerContext` so repeats do not pay again.
Requests that are sent as-is are serialized in `prepare` and passed through gRPC
with an identity serializer: the timed loop then costs what a tuned client costs.

Every job checks every answer and raises `VerificationError` on the first wrong one.
"""

from __future__ import annotations

import hashlib
import random
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from bench.common import (
    Dataset,
    VerificationError,
    batches_by_size,
    bs_grpc,
    bs_pb2,
    missing_digests,
    re_pb2,
    read_resource,
    rpc_error,
    write_resource,
)
from bench.loadgen import JobResult, WorkerContext

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"

# Generous per-call deadlines: they exist so that a hung server fails the phase
# instead of hanging the benchmark, not to judge speed.
RPC_TIMEOUT = 120.0
BIG_RPC_TIMEOUT = 600.0

DigestKey = tuple[str, int]


def _key(digest: re_pb2.Digest) -> DigestKey:
    return (digest.hash, digest.size_bytes)


def _raw_unary(
    ctx: WorkerContext, address: str, method: str, response_type: Any
) -> grpc.UnaryUnaryMultiCallable:
    """A unary method that takes pre-serialized request bytes."""
    return ctx.channel(address).unary_unary(
        _CAS + method, request_serializer=None, response_deserializer=response_type.FromString
    )


def _cached(ctx: WorkerContext, key: Any, build: Callable[[], Any]) -> Any:
    if key not in ctx.cache:
        ctx.cache[key] = build()
    return ctx.cache[key]


# --------------------------------------------------------------------------- CAS batches


@dataclass
class BatchUpdateJob:
    """Upload `dataset[start:stop]` with BatchUpdateBlobs, `batch_limit` bytes a call."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int
    batch_limit: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._requests: list[tuple[bytes, set[DigestKey], int]] = []
        for batch in batches_by_size(self.dataset.blobs(range(self.start, self.stop)), self.batch_limit):
            request = re_pb2.BatchUpdateBlobsRequest(instance_name=self.instance)
            for digest, data in batch:
                request.requests.add(digest=digest, data=data)
            self._requests.append(
                (request.SerializeToString(), {_key(d) for d, _ in batch}, sum(len(b) for _, b in batch))
            )
        self._call = _raw_unary(ctx, self.address, "BatchUpdateBlobs", re_pb2.BatchUpdateBlobsResponse)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for payload, expected, size in self._requests:
            t0 = time.monotonic()
            try:
                response = self._call(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"BatchUpdateBlobs ({len(expected)} blobs, {size} bytes)", err) from None
            result.latencies.append(time.monotonic() - t0)
            seen: set[DigestKey] = set()
            for r in response.responses:
                if r.status.code != 0:
                    raise VerificationError(
                        f"BatchUpdateBlobs: blob {r.digest.hash}/{r.digest.size_bytes} failed: "
                        f"code {r.status.code} {r.status.message!r}"
                    )
                seen.add(_key(r.digest))
            if seen != expected:
                raise VerificationError(
                    f"BatchUpdateBlobs: answered for {len(seen)} digests, sent {len(expected)}; "
                    f"{len(expected - seen)} without a status"
                )
            result.ops += len(expected)
            result.bytes += size
        return result


@dataclass
class BatchReadJob:
    """Read `dataset[start:stop]` back with BatchReadBlobs and compare every byte."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int
    batch_limit: int

    def prepare(self, ctx: WorkerContext) -> None:
        def build() -> list[tuple[bytes, dict[DigestKey, bytes], int]]:
            requests = []
            for batch in batches_by_size(self.dataset.blobs(range(self.start, self.stop)), self.batch_limit):
                request = re_pb2.BatchReadBlobsRequest(instance_name=self.instance)
                request.digests.extend(d for d, _ in batch)
                requests.append(
                    (request.SerializeToString(), {_key(d): b for d, b in batch}, sum(len(b) for _, b in batch))
                )
            return requests

        key = ("batch-read", self.address, self.instance, self.dataset, self.start, self.stop, self.batch_limit)
        self._requests = _cached(ctx, key, build)
        self._call = _raw_unary(ctx, self.address, "BatchReadBlobs", re_pb2.BatchReadBlobsResponse)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for payload, expected, size in self._requests:
            t0 = time.monotonic()
            try:
                response = self._call(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"BatchReadBlobs ({len(expected)} blobs)", err) from None
            result.latencies.append(time.monotonic() - t0)
            _check_batch_read(response, expected)
            result.ops += len(expected)
            result.bytes += size
        return result


def _check_batch_read(response: re_pb2.BatchReadBlobsResponse, expected: dict[DigestKey, bytes]) -> None:
    seen = 0
    for r in response.responses:
        key = _key(r.digest)
        if r.status.code != 0:
            raise VerificationError(
                f"BatchReadBlobs: blob {key[0]}/{key[1]} failed: code {r.status.code} {r.status.message!r}"
            )
        want = expected.get(key)
        if want is None:
            raise VerificationError(f"BatchReadBlobs: answered for {key[0]}/{key[1]}, which was not asked")
        if r.data != want:
            raise VerificationError(
                f"BatchReadBlobs: blob {key[0]}/{key[1]}: got {len(r.data)} bytes that differ from the upload"
            )
        seen += 1
    if seen != len(expected):
        raise VerificationError(f"BatchReadBlobs: {seen} blobs answered, {len(expected)} asked")


# --------------------------------------------------------------------------- FindMissingBlobs


@dataclass(frozen=True)
class FmbPlan:
    """`present` blobs (uploaded beforehand) mixed with `missing` never-uploaded digests,
    shuffled and cut into requests of `per_request` digests."""

    present: Dataset
    missing_seed: int
    missing: int
    per_request: int

    def requests(self, instance: str) -> list[tuple[bytes, set[DigestKey], int]]:
        """(serialized request, expected missing set, digest count) for every request."""
        present = [d for d, _ in self.present.blobs(range(self.present.count))]
        absent = missing_digests(self.missing_seed, self.missing)
        absent_keys = {_key(d) for d in absent}
        digests = present + absent
        random.Random(self.missing_seed ^ 0xF00D).shuffle(digests)
        out = []
        for i in range(0, len(digests), self.per_request):
            chunk = digests[i : i + self.per_request]
            request = re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=chunk)
            keys = {_key(d) for d in chunk}
            out.append((request.SerializeToString(), keys & absent_keys, len(chunk)))
        return out


@dataclass
class FindMissingJob:
    """Send requests `part`, `part + parts`, ... of an `FmbPlan`, checking every answer."""

    address: str
    instance: str
    plan: FmbPlan
    part: int
    parts: int

    def prepare(self, ctx: WorkerContext) -> None:
        requests = _cached(ctx, ("fmb", self.instance, self.plan), lambda: self.plan.requests(self.instance))
        self._requests = requests[self.part :: self.parts]
        self._call = _raw_unary(ctx, self.address, "FindMissingBlobs", re_pb2.FindMissingBlobsResponse)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for payload, expected, count in self._requests:
            t0 = time.monotonic()
            try:
                response = self._call(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"FindMissingBlobs ({count} digests)", err) from None
            result.latencies.append(time.monotonic() - t0)
            _check_missing(response, expected)
            result.ops += count
            result.counters["missing"] = result.counters.get("missing", 0) + len(expected)
        return result


def _check_missing(response: re_pb2.FindMissingBlobsResponse, expected: set[DigestKey]) -> None:
    got = {_key(d) for d in response.missing_blob_digests}
    if got != expected:
        wrongly_missing = len(got - expected)
        wrongly_present = len(expected - got)
        raise VerificationError(
            f"FindMissingBlobs: {wrongly_missing} present digests reported missing, "
            f"{wrongly_present} missing digests not reported (expected {len(expected)} missing)"
        )


# --------------------------------------------------------------------------- ByteStream, small blobs


def _write_stream(
    resource: str, data: bytes | memoryview, chunk: int, tail: bytes = b""
) -> Iterator[bs_pb2.WriteRequest]:
    """WriteRequests for `data + tail` in `chunk`-byte pieces; the resource name only in the first,
    as Bazel sends it."""
    total = len(data) + len(tail)
    offset = 0
    first = True
    while True:
        piece = bytes(data[offset : offset + chunk])
        if len(piece) < chunk and tail:
            piece += tail[: chunk - len(piece)] if offset + len(piece) >= len(data) else b""
            # A tail is only ever smaller than one chunk (see BigBlob), so one append finishes it.
        end = offset + len(piece)
        yield bs_pb2.WriteRequest(
            resource_name=resource if first else "",
            write_offset=offset,
            data=piece,
            finish_write=end >= total,
        )
        first = False
        offset = end
        if offset >= total:
            return


@dataclass
class SmallWriteJob:
    """Upload `dataset[start:stop]`, one ByteStream.Write stream per blob, in `chunk`-byte pieces."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int
    chunk: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blobs = list(self.dataset.blobs(range(self.start, self.stop)))
        self._write = bs_grpc.ByteStreamStub(ctx.channel(self.address)).Write

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for digest, data in self._blobs:
            resource = write_resource(self.instance, str(uuid.uuid4()), digest)
            t0 = time.monotonic()
            try:
                response = self._write(_write_stream(resource, data, self.chunk), timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"ByteStream.Write {resource}", err) from None
            result.latencies.append(time.monotonic() - t0)
            if response.committed_size != len(data):
                raise VerificationError(
                    f"ByteStream.Write {resource}: committed_size {response.committed_size}, sent {len(data)}"
                )
            result.ops += 1
            result.bytes += len(data)
        return result


@dataclass
class SmallReadJob:
    """Read `dataset[start:stop]`, one ByteStream.Read stream per blob, comparing every byte."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blobs = [
            (read_resource(self.instance, d), data) for d, data in self.dataset.blobs(range(self.start, self.stop))
        ]
        self._read = bs_grpc.ByteStreamStub(ctx.channel(self.address)).Read

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for resource, data in self._blobs:
            t0 = time.monotonic()
            try:
                got = b"".join(r.data for r in self._read(bs_pb2.ReadRequest(resource_name=resource),
                                                          timeout=RPC_TIMEOUT))
            except grpc.RpcError as err:
                raise rpc_error(f"ByteStream.Read {resource}", err) from None
            result.latencies.append(time.monotonic() - t0)
            if got != data:
                raise VerificationError(f"ByteStream.Read {resource}: got {len(got)} bytes that differ from the upload")
            result.ops += 1
            result.bytes += len(data)
        return result


# --------------------------------------------------------------------------- ByteStream, big blobs


_TRAILER = struct.Struct("<QQ")


class BigBlob:
    """A `size`-byte random blob whose last 16 bytes name a `variant`.

    The random body is made once per worker and its sha256 state kept, so each new
    variant (a blob the server has never seen) costs a 16-byte hash update instead of
    regenerating and rehashing hundreds of megabytes.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.body = b"".join(random.randbytes(1 << 20) for _ in range(-(-(size - _TRAILER.size) // (1 << 20))))
        self.body = self.body[: size - _TRAILER.size]
        self._hasher = hashlib.sha256(self.body)

    def trailer(self, variant: int) -> bytes:
        return _TRAILER.pack(0xB16B10B, variant)

    def digest(self, variant: int) -> re_pb2.Digest:
        hasher = self._hasher.copy()
        hasher.update(self.trailer(variant))
        return re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=self.size)


def _big_blob(ctx: WorkerContext, size: int) -> BigBlob:
    return _cached(ctx, ("big-blob", size), lambda: BigBlob(size))


@dataclass
class BigWriteJob:
    """Upload one variant of a big blob with ByteStream.Write in `chunk`-byte pieces."""

    address: str
    instance: str
    size: int
    variant: int
    chunk: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blob = _big_blob(ctx, self.size)
        self._digest = self._blob.digest(self.variant)
        self._write = bs_grpc.ByteStreamStub(ctx.channel(self.address)).Write

    def run(self, ctx: WorkerContext) -> JobResult:
        resource = write_resource(self.instance, str(uuid.uuid4()), self._digest)
        body = memoryview(self._blob.body)
        t0 = time.monotonic()
        try:
            response = self._write(
                _write_stream(resource, body, self.chunk, self._blob.trailer(self.variant)),
                timeout=BIG_RPC_TIMEOUT,
            )
        except grpc.RpcError as err:
            raise rpc_error(f"ByteStream.Write {resource}", err) from None
        elapsed = time.monotonic() - t0
        if response.committed_size != self.size:
            raise VerificationError(
                f"ByteStream.Write {resource}: committed_size {response.committed_size}, sent {self.size}"
            )
        return JobResult(ops=1, bytes=self.size, latencies=[elapsed])


@dataclass
class BigReadJob:
    """Read one variant of a big blob with ByteStream.Read, comparing every chunk with the
    source as it arrives (the source's sha256 is the digest, so equal bytes mean a
    verified sha256, at memcmp speed instead of a second hashing core)."""

    address: str
    instance: str
    size: int
    variant: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blob = _big_blob(ctx, self.size)
        self._digest = self._blob.digest(self.variant)
        self._read = bs_grpc.ByteStreamStub(ctx.channel(self.address)).Read

    def run(self, ctx: WorkerContext) -> JobResult:
        resource = read_resource(self.instance, self._digest)
        body = self._blob.body
        trailer = self._blob.trailer(self.variant)
        body_len = len(body)
        offset = 0
        t0 = time.monotonic()
        try:
            for response in self._read(bs_pb2.ReadRequest(resource_name=resource), timeout=BIG_RPC_TIMEOUT):
                data = response.data
                end = offset + len(data)
                if end <= body_len:
                    same = data == body[offset:end]
                else:
                    same = data == body[offset:body_len] + trailer[max(0, offset - body_len) : end - body_len]
                if not same or end > self.size:
                    raise VerificationError(
                        f"ByteStream.Read {resource}: bytes {offset}..{end} differ from the upload"
                    )
                offset = end
        except grpc.RpcError as err:
            raise rpc_error(f"ByteStream.Read {resource} (after {offset} bytes)", err) from None
        elapsed = time.monotonic() - t0
        if offset != self.size:
            raise VerificationError(f"ByteStream.Read {resource}: got {offset} bytes, expected {self.size}")
        return JobResult(ops=1, bytes=self.size, latencies=[elapsed])


# --------------------------------------------------------------------------- GetTree


@dataclass
class GetTreeJob:
    """Fetch a whole tree with GetTree (following page tokens) until `iterations` trees
    or `time_limit` seconds, checking that exactly the uploaded directories come back."""

    address: str
    instance: str
    root: tuple[str, int]
    expected_dirs: frozenset[DigestKey]
    expected_files: int
    page_size: int
    iterations: int
    time_limit: float

    def prepare(self, ctx: WorkerContext) -> None:
        self._get_tree = ctx.channel(self.address).unary_stream(
            _CAS + "GetTree",
            request_serializer=re_pb2.GetTreeRequest.SerializeToString,
            response_deserializer=re_pb2.GetTreeResponse.FromString,
        )

    def _one_tree(self) -> tuple[int, int]:
        root = re_pb2.Digest(hash=self.root[0], size_bytes=self.root[1])
        token = ""
        seen: set[DigestKey] = set()
        files = pages = 0
        for _ in range(100_000):  # bound: a server that never stops paging fails below
            request = re_pb2.GetTreeRequest(
                instance_name=self.instance, root_digest=root, page_size=self.page_size, page_token=token
            )
            token = ""
            for response in self._get_tree(request, timeout=RPC_TIMEOUT):
                pages += 1
                for directory in response.directories:
                    blob = directory.SerializeToString(deterministic=True)
                    key = (hashlib.sha256(blob).hexdigest(), len(blob))
                    if key not in self.expected_dirs or key in seen:
                        raise VerificationError(
                            f"GetTree: returned directory {key[0]}/{key[1]} "
                            + ("twice" if key in seen else "that is not in the tree")
                        )
                    seen.add(key)
                    files += len(directory.files)
                token = response.next_page_token or token
            if not token:
                break
        if len(seen) != len(self.expected_dirs) or files != self.expected_files:
            raise VerificationError(
                f"GetTree: got {len(seen)} directories / {files} files, "
                f"expected {len(self.expected_dirs)} / {self.expected_files}"
            )
        return len(seen), pages

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        deadline = time.monotonic() + self.time_limit
        pages = 0
        for _ in range(self.iterations):
            t0 = time.monotonic()
            try:
                _, tree_pages = self._one_tree()
            except grpc.RpcError as err:
                raise rpc_error(f"GetTree {self.root[0]}/{self.root[1]} page_size={self.page_size}", err) from None
            result.latencies.append(time.monotonic() - t0)
            result.ops += 1
            pages += tree_pages
            if time.monotonic() > deadline:
                break
        result.counters["pages"] = pages
        return result


# --------------------------------------------------------------------------- mixed load


@dataclass
class MixJob:
    """A client looping FindMissingBlobs(`fmb_size` digests) + BatchReadBlobs(`read_size`
    blobs) for `duration` seconds (at most `max_ops` calls), like many builds checking
    and fetching small outputs at once."""

    address: str
    instance: str
    dataset: Dataset
    missing_seed: int
    fmb_size: int
    read_size: int
    duration: float
    seed: int
    variety: int = 64
    max_ops: int = 2_000_000

    def prepare(self, ctx: WorkerContext) -> None:
        def blobs() -> dict[DigestKey, tuple[re_pb2.Digest, bytes]]:
            return {_key(d): (d, data) for d, data in self.dataset.blobs(range(self.dataset.count))}

        present = _cached(ctx, ("mix-blobs", self.dataset), blobs)
        keys = list(present)
        absent = missing_digests(self.missing_seed, self.variety * self.fmb_size)
        rng = random.Random(self.seed)
        self._fmb: list[tuple[bytes, set[DigestKey]]] = []
        self._reads: list[tuple[bytes, dict[DigestKey, bytes]]] = []
        half = self.fmb_size // 2
        for i in range(self.variety):
            hits = [present[k][0] for k in rng.sample(keys, min(half, len(keys)))]
            misses = absent[i * self.fmb_size : i * self.fmb_size + self.fmb_size - len(hits)]
            digests = hits + misses
            rng.shuffle(digests)
            request = re_pb2.FindMissingBlobsRequest(instance_name=self.instance, blob_digests=digests)
            self._fmb.append((request.SerializeToString(), {_key(d) for d in misses}))
            wanted = rng.sample(keys, min(self.read_size, len(keys)))
            read = re_pb2.BatchReadBlobsRequest(instance_name=self.instance, digests=[present[k][0] for k in wanted])
            self._reads.append((read.SerializeToString(), {k: present[k][1] for k in wanted}))
        self._find = _raw_unary(ctx, self.address, "FindMissingBlobs", re_pb2.FindMissingBlobsResponse)
        self._batch_read = _raw_unary(ctx, self.address, "BatchReadBlobs", re_pb2.BatchReadBlobsResponse)

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult(kinds={"fmb": [], "read": []})
        fmb_lat = result.kinds["fmb"]
        read_lat = result.kinds["read"]
        deadline = time.monotonic() + self.duration
        i = 0
        now = time.monotonic()
        while now < deadline and result.ops < self.max_ops:
            payload, expected = self._fmb[i % self.variety]
            try:
                response = self._find(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"FindMissingBlobs ({self.fmb_size} digests)", err) from None
            t1 = time.monotonic()
            fmb_lat.append(t1 - now)
            _check_missing(response, expected)
            payload, wanted = self._reads[i % self.variety]
            t1 = time.monotonic()
            try:
                read = self._batch_read(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"BatchReadBlobs ({self.read_size} blobs)", err) from None
            now = time.monotonic()
            read_lat.append(now - t1)
            _check_batch_read(read, wanted)
            result.ops += 2
            i += 1
            now = time.monotonic()
        result.latencies = fmb_lat + read_lat
        return result
