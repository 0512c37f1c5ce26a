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
    bs_pb2,
    missing_digests,
    re_pb2,
    read_resource,
    rpc_error,
    write_resource,
)
from bench.loadgen import JobResult, WorkerContext
from casbah.reapi.wire import read_varint

_CAS = "/build.bazel.remote.execution.v2.ContentAddressableStorage/"
_BYTESTREAM = "/google.bytestream.ByteStream/"

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
    """WriteRequests for `data + tail` in `chunk`-byte pieces, the resource name in the
    first only (as Bazel sends it).  `tail` lets a big blob's variant bytes follow its
    shared body without copying the body."""
    total = len(data) + len(tail)
    offset = 0
    while True:
        if offset < len(data):
            piece = bytes(data[offset : offset + chunk])
            if len(piece) < chunk and tail:
                piece += tail[: chunk - len(piece)]
        else:
            start = offset - len(data)
            piece = tail[start : start + chunk]
        end = offset + len(piece)
        yield bs_pb2.WriteRequest(
            resource_name=resource if offset == 0 else "",
            write_offset=offset,
            data=piece,
            finish_write=end >= total,
        )
        offset = end
        if offset >= total:
            return


@dataclass
class SmallWriteJob:
    """Upload `dataset[start:stop]`, one ByteStream.Write stream per blob, in `chunk`-byte
    pieces.  Requests (upload ids included) are serialized in `prepare`, so the timed loop
    spends the client's share of the 2 cores on gRPC only."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int
    chunk: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._writes: list[tuple[str, list[bytes], int]] = []
        for digest, data in self.dataset.blobs(range(self.start, self.stop)):
            resource = write_resource(self.instance, str(uuid.uuid4()), digest)
            requests = [r.SerializeToString() for r in _write_stream(resource, data, self.chunk)]
            self._writes.append((resource, requests, len(data)))
        self._write = ctx.channel(self.address).stream_unary(
            _BYTESTREAM + "Write", request_serializer=None, response_deserializer=bs_pb2.WriteResponse.FromString
        )

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for resource, requests, size in self._writes:
            t0 = time.monotonic()
            try:
                response = self._write(iter(requests), timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"ByteStream.Write {resource}", err) from None
            result.latencies.append(time.monotonic() - t0)
            if response.committed_size != size:
                raise VerificationError(
                    f"ByteStream.Write {resource}: committed_size {response.committed_size}, sent {size}"
                )
            result.ops += 1
            result.bytes += size
        return result


@dataclass
class SmallReadJob:
    """Read `dataset[start:stop]`, one ByteStream.Read stream per blob, comparing every byte
    (in wire form, as BigReadJob does)."""

    address: str
    instance: str
    dataset: Dataset
    start: int
    stop: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._reads = [
            (read_resource(self.instance, d), bs_pb2.ReadRequest(resource_name=read_resource(self.instance, d))
             .SerializeToString(), memoryview(data))
            for d, data in self.dataset.blobs(range(self.start, self.stop))
        ]
        self._read = ctx.channel(self.address).unary_stream(
            _BYTESTREAM + "Read", request_serializer=None, response_deserializer=None
        )

    def run(self, ctx: WorkerContext) -> JobResult:
        result = JobResult()
        for resource, request, data in self._reads:
            offset = 0
            t0 = time.monotonic()
            try:
                for raw in self._read(request, timeout=RPC_TIMEOUT):
                    span = _read_response_data(raw)
                    if span is None:
                        raw = bs_pb2.ReadResponse.FromString(raw).data
                        span = (0, len(raw))
                    start, length = span
                    end = offset + length
                    if end > len(data) or not raw.startswith(data[offset:end], start):
                        raise VerificationError(
                            f"ByteStream.Read {resource}: bytes {offset}..{end} differ from the upload"
                        )
                    offset = end
            except grpc.RpcError as err:
                raise rpc_error(f"ByteStream.Read {resource}", err) from None
            result.latencies.append(time.monotonic() - t0)
            if offset != len(data):
                raise VerificationError(f"ByteStream.Read {resource}: got {offset} bytes, expected {len(data)}")
            result.ops += 1
            result.bytes += len(data)
        return result


# --------------------------------------------------------------------------- ByteStream, big blobs


_TRAILER = struct.Struct("<QQ")


class BigBlob:
    """A `size`-byte random blob whose last 16 bytes name a `variant`.

    The random body is made once per worker and its sha256 state kept, so each new
    variant (a blob the server has never seen) costs a 16-byte hash update instead of
    regenerating and rehashing hundreds of megabytes.  The WriteRequests of the body's
    middle chunks are serialized once too: building and serializing 1 MiB messages
    costs the client ~2.5 ms/MiB (fresh allocations fault in every page), as much as
    a server spends storing them, which would make the client the bottleneck.
    """

    def __init__(self, size: int) -> None:
        if size < _TRAILER.size:
            raise ValueError(f"a big blob needs at least {_TRAILER.size} bytes")
        self.size = size
        # Seeded, so every worker process builds the same bytes for the same size.
        rng = random.Random(size)
        body_len = size - _TRAILER.size
        step = 1 << 20
        self.body = b"".join(rng.randbytes(min(step, body_len - o)) for o in range(0, body_len, step))
        self.view = memoryview(self.body)
        self._hasher = hashlib.sha256(self.body)
        self._middles: dict[int, list[bytes]] = {}

    def trailer(self, variant: int) -> bytes:
        return _TRAILER.pack(0xB16B10B, variant)

    def digest(self, variant: int) -> re_pb2.Digest:
        hasher = self._hasher.copy()
        hasher.update(self.trailer(variant))
        return re_pb2.Digest(hash=hasher.hexdigest(), size_bytes=self.size)

    def expected(self, variant: int, offset: int, end: int) -> bytes | memoryview:
        """Bytes offset..end of a variant, without copying the body part."""
        body_len = len(self.body)
        if end <= body_len:
            return self.view[offset:end]
        return self.body[offset:body_len] + self.trailer(variant)[max(0, offset - body_len) : end - body_len]

    def write_requests(self, resource: str, variant: int, chunk: int) -> Iterator[bytes]:
        """Serialized WriteRequests of a variant.  Pieces that lie wholly in the shared body
        (all but the first, which names the upload, and the last one or two, which hold
        the trailer and finish_write) are serialized once and reused."""
        body_len = len(self.body)
        cached = self._middles.get(chunk)
        if cached is None:
            cached = self._middles[chunk] = [
                bs_pb2.WriteRequest(write_offset=o, data=self.view[o : o + chunk].tobytes()).SerializeToString()
                for o in range(chunk, body_len - chunk + 1, chunk)
            ]
        for offset in range(0, self.size, chunk):
            end = min(offset + chunk, self.size)
            if offset > 0 and end <= body_len and end < self.size:
                yield cached[offset // chunk - 1]
                continue
            yield bs_pb2.WriteRequest(
                resource_name=resource if offset == 0 else "",
                write_offset=offset,
                data=bytes(self.expected(variant, offset, end)),
                finish_write=end == self.size,
            ).SerializeToString()


def _big_blob(ctx: WorkerContext, size: int) -> BigBlob:
    # Kept across targets: the same bytes serve every server, and making them costs a second.
    if ("big-blob", size) not in ctx.keep:
        ctx.keep.clear()  # at most one big body per worker: they are hundreds of MiB
        ctx.keep[("big-blob", size)] = BigBlob(size)
    return ctx.keep[("big-blob", size)]


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
        self._write = ctx.channel(self.address).stream_unary(
            _BYTESTREAM + "Write", request_serializer=None, response_deserializer=bs_pb2.WriteResponse.FromString
        )
        # Build the reusable chunks now, not in the timed write.
        for _ in self._blob.write_requests("", self.variant, self.chunk):
            break

    def run(self, ctx: WorkerContext) -> JobResult:
        resource = write_resource(self.instance, str(uuid.uuid4()), self._digest)
        t0 = time.monotonic()
        try:
            response = self._write(
                self._blob.write_requests(resource, self.variant, self.chunk), timeout=BIG_RPC_TIMEOUT
            )
        except grpc.RpcError as err:
            raise rpc_error(f"ByteStream.Write {resource}", err) from None
        elapsed = time.monotonic() - t0
        if response.committed_size != self.size:
            raise VerificationError(
                f"ByteStream.Write {resource}: committed_size {response.committed_size}, sent {self.size}"
            )
        return JobResult(ops=1, bytes=self.size, latencies=[elapsed])


def _read_response_data(raw: bytes) -> tuple[int, int] | None:
    """(start, length) of `data` inside a serialized ReadResponse, or None if it has any
    other layout (then the caller parses it properly).  ReadResponse has one field,
    `bytes data = 10`, so a response is tag 0x52, a varint length and the data."""
    if not raw:
        return 0, 0
    if raw[0] != 0x52:
        return None
    length, start = _varint(raw, 1)
    return (start, length) if start + length == len(raw) else None


@dataclass
class BigReadJob:
    """Read one variant of a big blob with ByteStream.Read, comparing every chunk with the
    source as it arrives (the source's sha256 is the digest, so equal bytes mean a
    verified sha256, at memcmp speed instead of a second hashing core).  Responses are
    compared in their wire form: parsing a 1 MiB message costs the client ~0.9 ms."""

    address: str
    instance: str
    size: int
    variant: int

    def prepare(self, ctx: WorkerContext) -> None:
        self._blob = _big_blob(ctx, self.size)
        self._digest = self._blob.digest(self.variant)
        self._read = ctx.channel(self.address).unary_stream(
            _BYTESTREAM + "Read", request_serializer=bs_pb2.ReadRequest.SerializeToString, response_deserializer=None
        )

    def run(self, ctx: WorkerContext) -> JobResult:
        resource = read_resource(self.instance, self._digest)
        blob = self._blob
        offset = 0
        t0 = time.monotonic()
        try:
            for raw in self._read(bs_pb2.ReadRequest(resource_name=resource), timeout=BIG_RPC_TIMEOUT):
                span = _read_response_data(raw)
                if span is None:
                    data = bs_pb2.ReadResponse.FromString(raw).data
                    span, raw = (0, len(data)), data
                start, length = span
                end = offset + length
                # startswith compares with memcmp and takes a memoryview: no copy of 1 MiB.
                if end > self.size or not raw.startswith(blob.expected(self.variant, offset, end), start):
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


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a protobuf varint at `pos`: (value, position after it)."""
    try:
        return read_varint(buf, pos)
    except ValueError as exc:
        raise VerificationError(f"{exc} in a response") from None


# --------------------------------------------------------------------------- GetTree


def _split_get_tree_response(buf: bytes) -> tuple[list[bytes], str]:
    """The raw bytes of each `directories` entry (field 1) and the `next_page_token`
    (field 2) of a serialized GetTreeResponse.

    Hashing the Directory bytes exactly as they arrived is both the strictest check and
    4x cheaper than parsing and re-serializing 10k FileNodes, which would otherwise
    make the client, not the server, the slow side of this scenario."""
    directories: list[bytes] = []
    token = ""
    pos, end = 0, len(buf)
    while pos < end:
        tag, pos = _varint(buf, pos)
        field_number, wire_type = tag >> 3, tag & 7
        if wire_type == 2:
            length, pos = _varint(buf, pos)
            value = buf[pos : pos + length]
            pos += length
            if field_number == 1:
                directories.append(value)
            elif field_number == 2:
                token = value.decode()
        elif wire_type == 0:
            _, pos = _varint(buf, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
        else:
            raise VerificationError(f"GetTree: unexpected wire type {wire_type} in response")
    return directories, token


@dataclass
class GetTreeJob:
    """Fetch a whole tree with GetTree (following page tokens) until `iterations` trees
    or `time_limit` seconds, checking that exactly the uploaded directories come back:
    `expected_dirs` maps each directory's digest to its number of files."""

    address: str
    instance: str
    root: tuple[str, int]
    expected_dirs: dict[DigestKey, int]
    page_size: int
    iterations: int
    time_limit: float

    def prepare(self, ctx: WorkerContext) -> None:
        self._get_tree = ctx.channel(self.address).unary_stream(
            _CAS + "GetTree",
            request_serializer=re_pb2.GetTreeRequest.SerializeToString,
            response_deserializer=None,  # raw bytes, see _split_get_tree_response
        )
        self._expected_files = sum(self.expected_dirs.values())

    def _identify(self, blob: bytes) -> DigestKey:
        key = (hashlib.sha256(blob).hexdigest(), len(blob))
        if key in self.expected_dirs:
            return key
        # Not canonical as sent?  Still the right directory if it re-serializes canonically.
        canonical = re_pb2.Directory.FromString(blob).SerializeToString(deterministic=True)
        return (hashlib.sha256(canonical).hexdigest(), len(canonical))

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
                directories, page_token = _split_get_tree_response(response)
                for blob in directories:
                    key = self._identify(blob)
                    if key not in self.expected_dirs or key in seen:
                        raise VerificationError(
                            f"GetTree: returned directory {key[0]}/{key[1]} "
                            + ("twice" if key in seen else "that is not in the tree")
                        )
                    seen.add(key)
                    files += self.expected_dirs[key]
                # Only the last page of a stream says whether to continue.
                token = page_token
            if not token:
                break
        if len(seen) != len(self.expected_dirs) or files != self._expected_files:
            raise VerificationError(
                f"GetTree: got {len(seen)} directories / {files} files, "
                f"expected {len(self.expected_dirs)} / {self._expected_files}"
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
        t0 = time.monotonic()
        while t0 < deadline and result.ops < self.max_ops:
            payload, expected = self._fmb[i % self.variety]
            try:
                response = self._find(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"FindMissingBlobs ({self.fmb_size} digests)", err) from None
            fmb_lat.append(time.monotonic() - t0)
            _check_missing(response, expected)
            payload, wanted = self._reads[i % self.variety]
            t0 = time.monotonic()
            try:
                read = self._batch_read(payload, timeout=RPC_TIMEOUT)
            except grpc.RpcError as err:
                raise rpc_error(f"BatchReadBlobs ({self.read_size} blobs)", err) from None
            read_lat.append(time.monotonic() - t0)
            _check_batch_read(read, wanted)
            result.ops += 2
            i += 1
            t0 = time.monotonic()
        result.latencies = fmb_lat + read_lat
        return result
