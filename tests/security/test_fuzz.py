"""Fuzzing every RPC with hypothesis: raw garbage, structurally valid messages with hostile
fields (digests, sizes, resource names, page tokens, qualifiers, URIs, zstd data).

The server must never die, never answer INTERNAL/UNKNOWN to bad input (a bad request is
the client's error, and an INTERNAL invites retries), never hang, and afterwards its
stored data must be intact: every blob stored before the fuzzing reads back unchanged
and `casbah admin scrub` finds nothing corrupt.  Bounded: a fixed number of examples,
about a minute in all on the 2-core CI machine.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from security_helpers import OPTIONS, Casbah, cli, free_port

from casbah import compression
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

#: Codes that mean the server, not the request, failed: never acceptable for bad input.
#: UNAVAILABLE = the process died or dropped us; DEADLINE_EXCEEDED = it hung.
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DEADLINE_EXCEEDED}
TIMEOUT = 15
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=False)

#: Every status seen, per method: printed at the end (pytest -s) and checked per call.
SEEN: collections.Counter = collections.Counter()


class FuzzTarget:
    def __init__(self, server: Casbah, data_dir: Path) -> None:
        self.server = server
        self.data_dir = data_dir
        self.channel = grpc.insecure_channel(server.address, options=OPTIONS)
        self.before: dict[str, bytes] = {}  # digest -> content stored before fuzzing


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzTarget]:
    root = tmp_path_factory.mktemp("fuzz")
    data_dir = root / "data"
    server = Casbah(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir), "--instance", "A",
                     "--log-level", "warning"], root / "server.log").start()
    t = FuzzTarget(server, data_dir)
    # Content stored before the fuzzing: small blobs, one big one (ByteStream), a tree, an AC entry.
    cas = re_grpc.ContentAddressableStorageStub(t.channel)
    blobs = [os.urandom(n) for n in (1, 100, 4096, 70_000)] + [b"hello fuzz\n"]
    requests = []
    for data in blobs:
        digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
        requests.append(re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data))
        t.before[f"{digest.hash}/{digest.size_bytes}"] = data
    for instance in ("", "A"):
        response = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name=instance, requests=requests),
                                        timeout=TIMEOUT)
        assert all(r.status.code == 0 for r in response.responses)
    big = os.urandom(3 << 20)
    digest = hashlib.sha256(big).hexdigest()
    name = f"uploads/{uuid.uuid4()}/blobs/{digest}/{len(big)}"
    chunks = [big[i:i + (1 << 20)] for i in range(0, len(big), 1 << 20)]
    bs_grpc.ByteStreamStub(t.channel).Write(iter(
        bs_pb2.WriteRequest(resource_name=name, write_offset=i << 20, data=c, finish_write=i == len(chunks) - 1)
        for i, c in enumerate(chunks)), timeout=TIMEOUT)
    t.before[f"{digest}/{len(big)}"] = big
    yield t
    t.channel.close()
    server.stop()


def call(target: FuzzTarget, method: str, invoke) -> grpc.StatusCode:
    """Run one call, record its status, fail on a status that blames the server."""
    try:
        result = invoke()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
        code = grpc.StatusCode.OK
        details = ""
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    SEEN[(method, code.name)] += 1
    assert code not in FORBIDDEN, f"{method}: {code.name}: {details}\n{target.server.log()[-3000:]}"
    return code


# --- raw bytes as the request message ------------------------------------------------------------------------------

UNARY = [
    "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
    "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
    "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
    "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
    "/google.bytestream.ByteStream/QueryWriteStatus",
    "/build.bazel.remote.asset.v1.Fetch/FetchBlob",
    "/build.bazel.remote.asset.v1.Fetch/FetchDirectory",
    "/build.bazel.remote.asset.v1.Push/PushBlob",
    "/build.bazel.remote.asset.v1.Push/PushDirectory",
    "/buildstream.v2.ReferenceStorage/GetReference",
    "/buildstream.v2.ReferenceStorage/UpdateReference",
    "/buildstream.v2.ReferenceStorage/Status",
]
SERVER_STREAMING = ["/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
                    "/google.bytestream.ByteStream/Read"]
CLIENT_STREAMING = ["/google.bytestream.ByteStream/Write"]


def test_method_names_exist() -> None:
    """The raw-bytes fuzzer reaches real handlers, not UNIMPLEMENTED for a typo'd path."""
    pool = {f"/{s.full_name}/{m.name}" for pb in (re_pb2, bs_pb2, ra_pb2, bst_pb2)
            for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    assert set(UNARY + SERVER_STREAMING + CLIENT_STREAMING) <= pool


@settings(max_examples=500, **SETTINGS)
@given(method=st.sampled_from(UNARY + SERVER_STREAMING + CLIENT_STREAMING),
       messages=st.lists(st.binary(max_size=300), min_size=1, max_size=3))
def test_raw_bytes(target: FuzzTarget, method: str, messages: list[bytes]) -> None:
    channel = target.channel
    if method in UNARY:
        call(target, method, lambda: channel.unary_unary(method)(messages[0], timeout=TIMEOUT))
    elif method in SERVER_STREAMING:
        call(target, method, lambda: channel.unary_stream(method)(messages[0], timeout=TIMEOUT))
    else:
        call(target, method, lambda: channel.stream_unary(method)(iter(messages), timeout=TIMEOUT))


# --- structurally valid messages with hostile fields ---------------------------------------------------------------

HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
HASHES = st.one_of(
    HEX64,
    st.just(hashlib.sha256(b"").hexdigest()),
    st.text("0123456789abcdefABCDEF", min_size=0, max_size=70),
    st.text(max_size=80),
    HEX64.map(str.upper),
    HEX64.map(lambda h: h + "\n"),
)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
SIZES = st.one_of(st.integers(-2, 5000), INT64, st.sampled_from([0, (1 << 63) - 1, -(1 << 63), 1 << 40]))
FUNCTIONS = st.integers(0, 12)  # including values the enum does not name
INSTANCES = st.one_of(st.sampled_from(["", "A", "unknown", "A/blobs", "/", "A/"]), st.text(max_size=20))
TEXT = st.text(max_size=60)


@st.composite
def digests(draw) -> re_pb2.Digest:
    return re_pb2.Digest(hash=draw(HASHES), size_bytes=draw(SIZES))


@st.composite
def matching_blob(draw) -> tuple[re_pb2.Digest, bytes]:
    """A digest that is right for its data, so real writes happen too."""
    data = draw(st.binary(max_size=2000))
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data)), data


def blob_pairs(draw) -> tuple[re_pb2.Digest, bytes]:
    if draw(st.booleans()):
        return draw(matching_blob())
    return draw(digests()), draw(st.binary(max_size=500))


SEGMENTS = st.one_of(
    st.sampled_from(["blobs", "uploads", "compressed-blobs", "zstd", "deflate", "brotli", "identity", "blake3",
                     "sha256", "sha1", "sha256tree", "actions", "operations", "A", "", "..", "0", "-1", "10",
                     "9223372036854775807", "9223372036854775808", "²", "١٢", hashlib.sha256(b"").hexdigest(),
                     str(uuid.uuid4())]),
    HEX64,
    st.integers(-5, 1 << 64).map(str),
    st.text(max_size=12),
)


@st.composite
def resource_names(draw, write: bool) -> str:
    """Near-grammatical names (instance/uploads/uuid/compressed-blobs/zstd/fn/hash/size/meta) with
    random substitutions, plus wholly random segment lists."""
    if draw(st.booleans()):
        return "/".join(draw(st.lists(SEGMENTS, max_size=9)))
    parts: list[str] = []
    instance = draw(st.sampled_from(["", "A", "a/b", "unknown", "blobs"]))
    if instance:
        parts.append(instance)
    if write:
        parts += ["uploads", draw(st.sampled_from([str(uuid.uuid4()), "", "x"]))]
    if draw(st.booleans()):
        parts += ["compressed-blobs", draw(st.sampled_from(["zstd", "deflate", "gzip", ""]))]
    else:
        parts.append("blobs")
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from(["blake3", "sha256", "md5", "sha256tree"])))
    parts += [draw(HASHES), str(draw(SIZES))]
    if draw(st.booleans()):
        parts += draw(st.lists(SEGMENTS, max_size=3))
    return "/".join(parts)


@st.composite
def timestamps(draw):
    from google.protobuf import duration_pb2, timestamp_pb2

    cls = draw(st.sampled_from([timestamp_pb2.Timestamp, duration_pb2.Duration]))
    return cls, dict(seconds=draw(INT64), nanos=draw(st.integers(-(1 << 31), (1 << 31) - 1)))


QUALIFIERS = st.lists(st.builds(ra_pb2.Qualifier, name=st.one_of(st.sampled_from(
    ["resource_type", "checksum.sri", "directory", "vcs.branch", "vcs.commit", ""]), TEXT), value=TEXT), max_size=4)
URIS = st.lists(st.one_of(TEXT, st.sampled_from(["https://example.com/x.tar.gz", "file:///etc/passwd",
                                                  "urn:fdc:buildstream.build:2020:v1:key", "git+ssh://h/r",
                                                  "http://127.0.0.1:1/x", ""])), max_size=3)


def _output_directory(draw):
    return re_pb2.OutputDirectory(path=draw(TEXT), tree_digest=draw(digests()),
                                  root_directory_digest=draw(digests()))


@st.composite
def structured_call(draw):
    """(method, callable) for one RPC with hostile but well-typed fields."""
    rpc = draw(st.sampled_from(["caps", "find", "update", "read", "tree", "bsread", "bswrite", "query", "getac",
                                "updac", "fetchb", "fetchd", "pushb", "pushd", "getref", "updref", "status"]))
    inst = draw(INSTANCES)
    fn = draw(FUNCTIONS)

    def run(channel: grpc.Channel):
        cas = re_grpc.ContentAddressableStorageStub(channel)
        if rpc == "caps":
            return re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re_pb2.GetCapabilitiesRequest(instance_name=inst), timeout=TIMEOUT)
        if rpc == "find":
            return cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                instance_name=inst, blob_digests=ds, digest_function=fn), timeout=TIMEOUT)
        if rpc == "update":
            return cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name=inst, digest_function=fn,
                                        requests=reqs), timeout=TIMEOUT)
        if rpc == "read":
            return cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
                instance_name=inst, digests=ds, digest_function=fn, acceptable_compressors=compressors),
                timeout=TIMEOUT)
        if rpc == "tree":
            return cas.GetTree(re_pb2.GetTreeRequest(instance_name=inst, root_digest=ds[0] if ds else None,
                                                     page_size=page_size, page_token=token, digest_function=fn),
                               timeout=TIMEOUT)
        if rpc == "bsread":
            return bs_grpc.ByteStreamStub(channel).Read(bs_pb2.ReadRequest(
                resource_name=name, read_offset=offset, read_limit=limit), timeout=TIMEOUT)
        if rpc == "bswrite":
            return bs_grpc.ByteStreamStub(channel).Write(iter(writes), timeout=TIMEOUT)
        if rpc == "query":
            return bs_grpc.ByteStreamStub(channel).QueryWriteStatus(
                bs_pb2.QueryWriteStatusRequest(resource_name=name), timeout=TIMEOUT)
        if rpc == "getac":
            return re_grpc.ActionCacheStub(channel).GetActionResult(re_pb2.GetActionResultRequest(
                instance_name=inst, action_digest=ds[0] if ds else None, digest_function=fn,
                inline_stdout=flag, inline_stderr=flag, inline_output_files=paths), timeout=TIMEOUT)
        if rpc == "updac":
            return re_grpc.ActionCacheStub(channel).UpdateActionResult(re_pb2.UpdateActionResultRequest(
                instance_name=inst, action_digest=ds[0] if ds else None, digest_function=fn,
                action_result=action_result), timeout=TIMEOUT)
        if rpc in ("fetchb", "fetchd"):
            request_cls = ra_pb2.FetchBlobRequest if rpc == "fetchb" else ra_pb2.FetchDirectoryRequest
            request = request_cls(instance_name=inst, uris=uris, qualifiers=qualifiers, digest_function=fn)
            if time_field is not None:
                cls, values = time_field
                try:
                    target_field = request.timeout if cls.__name__ == "Duration" else request.oldest_content_accepted
                    target_field.CopyFrom(cls(**values))
                except ValueError:
                    pass
            stub = ra_grpc.FetchStub(channel)
            return (stub.FetchBlob if rpc == "fetchb" else stub.FetchDirectory)(request, timeout=TIMEOUT)
        if rpc in ("pushb", "pushd"):
            stub = ra_grpc.PushStub(channel)
            common = dict(instance_name=inst, uris=uris, qualifiers=qualifiers, digest_function=fn,
                          references_blobs=ds[1:], references_directories=ds[2:])
            if rpc == "pushb":
                return stub.PushBlob(ra_pb2.PushBlobRequest(blob_digest=ds[0] if ds else None, **common),
                                     timeout=TIMEOUT)
            return stub.PushDirectory(ra_pb2.PushDirectoryRequest(
                root_directory_digest=ds[0] if ds else None, **common), timeout=TIMEOUT)
        refs = bst_grpc.ReferenceStorageStub(channel)
        if rpc == "getref":
            return refs.GetReference(bst_pb2.GetReferenceRequest(instance_name=inst, key=token), timeout=TIMEOUT)
        if rpc == "updref":
            return refs.UpdateReference(bst_pb2.UpdateReferenceRequest(
                instance_name=inst, keys=paths, digest=ds[0] if ds else None), timeout=TIMEOUT)
        return refs.Status(bst_pb2.StatusRequest(instance_name=inst), timeout=TIMEOUT)

    ds = draw(st.lists(digests(), max_size=4))
    reqs = [re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data, compressor=draw(st.integers(0, 6)))
            for d, data in (blob_pairs(draw) for _ in range(draw(st.integers(0, 3))))]
    compressors = draw(st.lists(st.integers(0, 6), max_size=3))
    page_size = draw(st.integers(-(1 << 31), (1 << 31) - 1))
    token = draw(st.one_of(TEXT, st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b"1:" + b).decode()),
                           st.sampled_from(["", "MTpmb286Mg==", "1:x:5"])))
    write = rpc in ("bswrite", "query")
    name = draw(resource_names(write))
    offset, limit = draw(INT64), draw(INT64)
    writes = [bs_pb2.WriteRequest(resource_name=draw(st.sampled_from([name, "", name + "x"])),
                                  write_offset=draw(st.one_of(st.integers(-2, 3000), INT64)),
                                  data=draw(st.binary(max_size=400)), finish_write=draw(st.booleans()))
              for _ in range(draw(st.integers(1, 4)))]
    flag = draw(st.booleans())
    paths = draw(st.lists(TEXT, max_size=3))
    action_result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path=p, digest=d) for p, d in zip(paths, ds, strict=False)],
        output_directories=[_output_directory(draw) for _ in range(draw(st.integers(0, 2)))],
        stdout_digest=draw(digests()), exit_code=draw(st.integers(-(1 << 31), (1 << 31) - 1)))
    uris = draw(URIS)
    qualifiers = draw(QUALIFIERS)
    time_field = draw(st.one_of(st.none(), timestamps()))
    return rpc, run


@settings(max_examples=700, **SETTINGS)
@given(case=structured_call())
def test_structured_messages(target: FuzzTarget, case) -> None:
    rpc, run = case
    call(target, rpc, lambda: run(target.channel))


# --- zstd garbage and bombs ----------------------------------------------------------------------------------------

BOMB = compression.compress(b"\0" * (32 << 20))  # 32 MiB of zeros in a few KiB


@st.composite
def zstd_payloads(draw) -> tuple[re_pb2.Digest, bytes]:
    kind = draw(st.sampled_from(["garbage", "truncated", "wrong-size", "bomb", "valid", "mutated"]))
    data = draw(st.binary(min_size=1, max_size=3000))
    digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    packed = compression.compress(data)
    if kind == "garbage":
        return digest, draw(st.binary(max_size=500))
    if kind == "truncated":
        return digest, packed[: draw(st.integers(0, max(0, len(packed) - 1)))]
    if kind == "wrong-size":
        return re_pb2.Digest(hash=digest.hash, size_bytes=draw(st.integers(0, 10_000))), packed
    if kind == "bomb":
        return re_pb2.Digest(hash=digest.hash, size_bytes=draw(st.sampled_from([0, 100, 1 << 20]))), BOMB
    if kind == "mutated":
        at = draw(st.integers(0, len(packed) - 1))
        return digest, packed[:at] + bytes([packed[at] ^ draw(st.integers(1, 255))]) + packed[at + 1:]
    return digest, packed


@settings(max_examples=300, **SETTINGS)
@given(payload=zstd_payloads(), via=st.sampled_from(["batch", "bytestream", "bytestream-chunked"]))
def test_zstd_garbage(target: FuzzTarget, payload, via: str) -> None:
    digest, packed = payload
    if via == "batch":
        code = call(target, "BatchUpdateBlobs(zstd)", lambda: re_grpc.ContentAddressableStorageStub(
            target.channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=packed,
                                                       compressor=re_pb2.Compressor.ZSTD)]), timeout=TIMEOUT))
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED)
        return
    name = f"uploads/{uuid.uuid4()}/compressed-blobs/zstd/{digest.hash}/{digest.size_bytes}"
    step = max(1, len(packed) // 3) if via == "bytestream-chunked" else max(1, len(packed))
    pieces = [packed[i:i + step] for i in range(0, len(packed), step)] or [b""]
    requests = [bs_pb2.WriteRequest(resource_name=name, write_offset=sum(map(len, pieces[:i])), data=p,
                                    finish_write=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    call(target, "ByteStream.Write(zstd)",
         lambda: bs_grpc.ByteStreamStub(target.channel).Write(iter(requests), timeout=TIMEOUT))


# --- afterwards: alive, intact, scrub-clean ---------------------------------------------------------------------------


def test_server_survived_and_data_is_intact(target: FuzzTarget) -> None:
    """Runs last in this module: everything stored before the fuzzing reads back unchanged
    (in both instances), no call blamed the server, and `casbah admin scrub` of the data
    directory finds every stored blob (old and fuzz-written) intact."""
    assert target.server.alive(), target.server.log()[-3000:]
    cas = re_grpc.ContentAddressableStorageStub(target.channel)
    for instance in ("", "A"):
        for key, data in target.before.items():
            h, size = key.split("/")
            digest = re_pb2.Digest(hash=h, size_bytes=int(size))
            if len(data) < (1 << 20):
                response = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(instance_name=instance, digests=[digest]),
                                              timeout=TIMEOUT)
                assert response.responses[0].data == data, key
            else:
                prefix = f"{instance}/" if instance else ""
                got = b"".join(r.data for r in bs_grpc.ByteStreamStub(target.channel).Read(
                    bs_pb2.ReadRequest(resource_name=f"{prefix}blobs/{h}/{size}"), timeout=TIMEOUT))
                assert got == data, key
    forbidden = {k: n for k, n in SEEN.items() if k[1] in {c.name for c in FORBIDDEN}}
    assert not forbidden
    print("status codes seen while fuzzing:", dict(sorted(SEEN.items())))
    assert target.server.stop() == 0
    scrub = cli("admin", "scrub", "--data-dir", str(target.data_dir), "--rate", "0", timeout=120)
    assert scrub.returncode == 0, scrub.stdout + scrub.stderr
    assert ": 0 corrupt, 0 removed" in scrub.stdout
    scanned = int(scrub.stdout.split("scanned ")[1].split()[0])
    assert scanned >= len(target.before)
