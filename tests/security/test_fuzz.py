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
from google.protobuf import duration_pb2, timestamp_pb2
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


def _digest(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _known_content() -> list[bytes]:
    """Blobs stored before fuzzing, fixed at import so strategies can name them: files, and a
    two-level Directory tree over them (so GetTree, Push and references reach real content)."""
    files = [b"hello fuzz\n", bytes(range(256)) * 40, b"#!/bin/sh\necho hi\n"]
    sub = re_pb2.Directory(files=[re_pb2.FileNode(name="data.bin", digest=_digest(files[1]))])
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="a.txt", digest=_digest(files[0])),
               re_pb2.FileNode(name="run.sh", digest=_digest(files[2]), is_executable=True)],
        directories=[re_pb2.DirectoryNode(name="sub", digest=_digest(sub.SerializeToString(deterministic=True)))])
    return [*files, sub.SerializeToString(deterministic=True), root.SerializeToString(deterministic=True)]


KNOWN = _known_content()
KNOWN_DIGESTS = [_digest(b) for b in KNOWN]


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
    blobs = [os.urandom(n) for n in (1, 100, 4096, 70_000)] + KNOWN
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
        result = None
    SEEN[(method, code.name)] += 1
    assert code not in FORBIDDEN, f"{method}: {code.name}: {details}\n{target.server.log()[-3000:]}"
    # Statuses inside OK responses: per-blob (batches) and per-asset (Fetch) ones blame no server either.
    inner = [r.status for r in getattr(result, "responses", ())]
    if result is not None and hasattr(result, "status"):
        inner.append(result.status)
    for status in inner:
        SEEN[(f"{method} (inner)", grpc.StatusCode(_CODES[status.code]).name)] += 1
        assert status.code not in (2, 13), f"{method}: inner status {status}\n{target.server.log()[-3000:]}"
    return code


_CODES = {c.value[0]: c.value for c in grpc.StatusCode}


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


@settings(max_examples=1000, **SETTINGS)
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


def _mostly(common: st.SearchStrategy, rare: st.SearchStrategy, percent: int = 80) -> st.SearchStrategy:
    """`common` in `percent`% of draws, else `rare`: mostly well-formed values get calls past
    validation into deeper code, while the rest still hits every check (one_of weighs equally)."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else rare)


HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
HASHES = _mostly(HEX64, st.one_of(
    st.just(hashlib.sha256(b"").hexdigest()),
    st.text("0123456789abcdefABCDEF", min_size=0, max_size=70),
    st.text(max_size=80),
    HEX64.map(str.upper),
    HEX64.map(lambda h: h + "\n"),
), 60)
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
SIZES = _mostly(st.integers(0, 5000), st.one_of(st.integers(-2, 5000), INT64,
                                                st.sampled_from([0, (1 << 63) - 1, -(1 << 63), 1 << 40])))
#: Mostly unset/SHA256/BLAKE3, sometimes values the enum does not name.
FUNCTIONS = _mostly(st.sampled_from([0, 0, 1, 9]), st.integers(-3, 12))
INSTANCES = _mostly(st.sampled_from(["", "A"]), st.one_of(st.sampled_from(["unknown", "A/blobs", "/", "A/"]),
                                                          st.text(max_size=20)))
TEXT = st.text(max_size=60)
KEYS = _mostly(st.text(min_size=1, max_size=40), TEXT)
PAGE_TOKENS = _mostly(st.just(""), st.one_of(
    TEXT,
    st.binary(max_size=40).map(lambda b: base64.urlsafe_b64encode(b"1:" + b).decode()),
    HEX64.map(lambda h: base64.urlsafe_b64encode(f"1:{h}:{len(h)}".encode()).decode()),
    st.sampled_from(["MTpmb286Mg==", "1:x:5", "=="]),
), 40)


@st.composite
def digests(draw) -> re_pb2.Digest:
    if draw(st.integers(0, 2)) == 0:  # a third name stored content, to get past the lookups
        return draw(st.sampled_from(KNOWN_DIGESTS))
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
    if draw(st.integers(0, 9)) < 3:
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


QUALIFIERS = _mostly(st.just([]), st.lists(st.builds(ra_pb2.Qualifier, name=st.one_of(st.sampled_from(
    ["resource_type", "checksum.sri", "directory", "vcs.branch", "vcs.commit", ""]), TEXT), value=TEXT), max_size=4),
    50)
URIS = st.lists(_mostly(st.sampled_from(["https://example.com/x.tar.gz", "file:///etc/passwd",
                                         "urn:fdc:buildstream.build:2020:v1:key", "git+ssh://h/r",
                                         "http://127.0.0.1:1/x", "urn:fdc:buildstream.build:2020:source:x/y"]),
                        st.one_of(TEXT, st.just("")), 60), min_size=0, max_size=3)


@st.composite
def structured_call(draw) -> tuple[str, object]:
    """(RPC name, callable(channel)) for one RPC with hostile but well-typed fields; only the
    fields that RPC reads are drawn."""
    rpc = draw(st.sampled_from(["caps", "find", "update", "read", "tree", "bsread", "bswrite", "query", "getac",
                                "updac", "fetchb", "fetchd", "pushb", "pushd", "getref", "updref", "status"]))
    inst = draw(INSTANCES)
    fn = draw(FUNCTIONS)
    ds = draw(st.lists(digests(), max_size=4))
    first = ds[0] if ds else None

    if rpc == "caps":
        request = re_pb2.GetCapabilitiesRequest(instance_name=inst)
        return rpc, lambda ch: re_grpc.CapabilitiesStub(ch).GetCapabilities(request, timeout=TIMEOUT)
    if rpc == "find":
        request = re_pb2.FindMissingBlobsRequest(instance_name=inst, blob_digests=ds, digest_function=fn)
        return rpc, lambda ch: re_grpc.ContentAddressableStorageStub(ch).FindMissingBlobs(request, timeout=TIMEOUT)
    if rpc == "update":
        reqs = [re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=data,
                                                       compressor=draw(st.sampled_from([0, 0, 1, 2, 3, 7])))
                for d, data in (blob_pairs(draw) for _ in range(draw(st.integers(0, 3))))]
        request = re_pb2.BatchUpdateBlobsRequest(instance_name=inst, digest_function=fn, requests=reqs)
        return rpc, lambda ch: re_grpc.ContentAddressableStorageStub(ch).BatchUpdateBlobs(request, timeout=TIMEOUT)
    if rpc == "read":
        request = re_pb2.BatchReadBlobsRequest(instance_name=inst, digests=ds, digest_function=fn,
                                               acceptable_compressors=draw(st.lists(st.integers(0, 6), max_size=3)))
        return rpc, lambda ch: re_grpc.ContentAddressableStorageStub(ch).BatchReadBlobs(request, timeout=TIMEOUT)
    if rpc == "tree":
        request = re_pb2.GetTreeRequest(instance_name=inst, root_digest=first, digest_function=fn,
                                        page_size=draw(st.one_of(st.integers(-3, 20),
                                                                 st.integers(-(1 << 31), (1 << 31) - 1))),
                                        page_token=draw(PAGE_TOKENS))
        return rpc, lambda ch: re_grpc.ContentAddressableStorageStub(ch).GetTree(request, timeout=TIMEOUT)
    if rpc == "bsread":
        request = bs_pb2.ReadRequest(resource_name=draw(resource_names(False)),
                                     read_offset=draw(st.one_of(st.integers(-2, 5000), INT64)),
                                     read_limit=draw(st.one_of(st.integers(-2, 5000), INT64)))
        return rpc, lambda ch: bs_grpc.ByteStreamStub(ch).Read(request, timeout=TIMEOUT)
    if rpc == "bswrite":
        name = draw(resource_names(True))
        writes = [bs_pb2.WriteRequest(resource_name=draw(st.sampled_from([name, name, "", name + "x"])),
                                      write_offset=draw(st.one_of(st.integers(-2, 3000), INT64)),
                                      data=draw(st.binary(max_size=400)), finish_write=draw(st.booleans()))
                  for _ in range(draw(st.integers(1, 4)))]
        return rpc, lambda ch: bs_grpc.ByteStreamStub(ch).Write(iter(writes), timeout=TIMEOUT)
    if rpc == "query":
        request = bs_pb2.QueryWriteStatusRequest(resource_name=draw(resource_names(True)))
        return rpc, lambda ch: bs_grpc.ByteStreamStub(ch).QueryWriteStatus(request, timeout=TIMEOUT)
    if rpc == "getac":
        request = re_pb2.GetActionResultRequest(
            instance_name=inst, action_digest=first, digest_function=fn, inline_stdout=draw(st.booleans()),
            inline_stderr=draw(st.booleans()), inline_output_files=draw(st.lists(TEXT, max_size=3)))
        return rpc, lambda ch: re_grpc.ActionCacheStub(ch).GetActionResult(request, timeout=TIMEOUT)
    if rpc == "updac":
        paths = draw(st.lists(TEXT, max_size=3))
        result = re_pb2.ActionResult(
            output_files=[re_pb2.OutputFile(path=p, digest=d) for p, d in zip(paths, ds[1:], strict=False)],
            output_directories=[re_pb2.OutputDirectory(path=draw(TEXT), tree_digest=draw(digests()),
                                                       root_directory_digest=draw(digests()))
                                for _ in range(draw(st.integers(0, 2)))],
            stdout_digest=draw(st.one_of(st.none(), digests())), exit_code=draw(st.integers(-(1 << 31), (1 << 31) - 1)))
        request = re_pb2.UpdateActionResultRequest(instance_name=inst, action_digest=first, digest_function=fn,
                                                   action_result=result)
        return rpc, lambda ch: re_grpc.ActionCacheStub(ch).UpdateActionResult(request, timeout=TIMEOUT)
    if rpc in ("fetchb", "fetchd"):
        cls = ra_pb2.FetchBlobRequest if rpc == "fetchb" else ra_pb2.FetchDirectoryRequest
        request = cls(instance_name=inst, uris=draw(URIS), qualifiers=draw(QUALIFIERS), digest_function=fn)
        seconds, nanos = draw(INT64), draw(st.integers(0, 999_999_999))
        try:  # protobuf itself refuses some out-of-range timestamps: those cannot be sent
            if draw(st.booleans()):
                request.timeout.CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
            if draw(st.booleans()):
                request.oldest_content_accepted.CopyFrom(timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos))
        except ValueError:
            pass
        name = "FetchBlob" if rpc == "fetchb" else "FetchDirectory"
        return rpc, lambda ch: getattr(ra_grpc.FetchStub(ch), name)(request, timeout=TIMEOUT)
    if rpc in ("pushb", "pushd"):
        common = dict(instance_name=inst, uris=draw(URIS), qualifiers=draw(QUALIFIERS), digest_function=fn,
                      references_blobs=ds[1:], references_directories=ds[2:])
        if draw(st.booleans()):
            common["expire_at"] = timestamp_pb2.Timestamp(seconds=draw(st.integers(-(1 << 40), 1 << 40)))
        if rpc == "pushb":
            request = ra_pb2.PushBlobRequest(blob_digest=first, **common)
            return rpc, lambda ch: ra_grpc.PushStub(ch).PushBlob(request, timeout=TIMEOUT)
        request = ra_pb2.PushDirectoryRequest(root_directory_digest=first, **common)
        return rpc, lambda ch: ra_grpc.PushStub(ch).PushDirectory(request, timeout=TIMEOUT)
    if rpc == "getref":
        request = bst_pb2.GetReferenceRequest(instance_name=inst, key=draw(KEYS))
        return rpc, lambda ch: bst_grpc.ReferenceStorageStub(ch).GetReference(request, timeout=TIMEOUT)
    if rpc == "updref":
        request = bst_pb2.UpdateReferenceRequest(instance_name=inst, keys=draw(st.lists(KEYS, max_size=3)),
                                                 digest=first)
        return rpc, lambda ch: bst_grpc.ReferenceStorageStub(ch).UpdateReference(request, timeout=TIMEOUT)
    request = bst_pb2.StatusRequest(instance_name=inst)
    return rpc, lambda ch: bst_grpc.ReferenceStorageStub(ch).Status(request, timeout=TIMEOUT)


@settings(max_examples=2500, **SETTINGS)
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


@settings(max_examples=400, **SETTINGS)
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
