"""Small client-side helpers shared by the service tests (plain gRPC stubs, no casbah client code).

The tests deliberately build requests by hand with the generated stubs, so what
is tested is the wire behaviour a third-party client sees.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator

import blake3
import grpc
import pytest
import zstandard

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

SHA256 = re_pb2.DigestFunction.SHA256
BLAKE3 = re_pb2.DigestFunction.BLAKE3
ZSTD = re_pb2.Compressor.ZSTD
IDENTITY = re_pb2.Compressor.IDENTITY
OK = grpc.StatusCode.OK.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
#: Client channel options: large enough for any message the server may send.
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def sha(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def b3(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=blake3.blake3(data).hexdigest(), size_bytes=len(data))


def digest_for(data: bytes, function: int = SHA256) -> re_pb2.Digest:
    return b3(data) if function == BLAKE3 else sha(data)


def key(d: re_pb2.Digest) -> tuple[str, int]:
    return d.hash, d.size_bytes


def rand(n: int) -> bytes:
    """Random (incompressible, unique) bytes: tests never see each other's blobs."""
    return os.urandom(n)


def zstd_bomb(expanded: int) -> bytes:
    """A valid zstd frame of RLE blocks: 4 bytes per 128 KiB of zeros (1 GiB in 32 KiB).

    Built by hand from RFC 8878 so making it costs nothing: magic, a frame header
    with a 128 KiB window and no content size, then RLE blocks of one zero byte.
    """
    n = max(1, expanded // (128 * 1024))
    blocks = b"".join(((128 * 1024) << 3 | 2 | (i == n - 1)).to_bytes(3, "little") + b"\0" for i in range(n))
    return b"\x28\xb5\x2f\xfd\x00\x38" + blocks


def peak_rss(pid: int) -> int:
    """A process's peak resident memory so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def zstd_frames(data: bytes, pieces: int = 3) -> bytes:
    """`data` as several concatenated zstd frames, which RFC 8878 allows and `zstd -d` decodes."""
    cctx = zstandard.ZstdCompressor()
    step = max(1, len(data) // pieces)
    return b"".join(cctx.compress(data[i:i + step]) for i in range(0, len(data), step))


def cas(channel: grpc.Channel) -> re_grpc.ContentAddressableStorageStub:
    return re_grpc.ContentAddressableStorageStub(channel)


def ac(channel: grpc.Channel) -> re_grpc.ActionCacheStub:
    return re_grpc.ActionCacheStub(channel)


def bs(channel: grpc.Channel) -> bs_grpc.ByteStreamStub:
    return bs_grpc.ByteStreamStub(channel)


def caps(channel: grpc.Channel) -> re_grpc.CapabilitiesStub:
    return re_grpc.CapabilitiesStub(channel)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Run `call`, which must fail with a gRPC error; return the error."""
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):  # a server-streaming call fails while it is consumed
            list(result)
    return info.value


def update_request(blobs: Iterable[bytes], digests: Iterable[re_pb2.Digest] | None = None, function: int = 0,
                   instance: str = "", compressor: int = IDENTITY) -> re_pb2.BatchUpdateBlobsRequest:
    """A BatchUpdateBlobsRequest; digests default to the blobs' own (SHA256 unless `function` says BLAKE3)."""
    blobs = list(blobs)
    digests = list(digests) if digests is not None else [digest_for(b, function or SHA256) for b in blobs]
    return re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, digest_function=function,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b, compressor=compressor)
                  for d, b in zip(digests, blobs, strict=True)],
    )


def upload(channel: grpc.Channel, blobs: Iterable[bytes], function: int = 0,
           instance: str = "") -> list[re_pb2.Digest]:
    """BatchUpdateBlobs that must succeed for every blob."""
    request = update_request(blobs, function=function, instance=instance)
    response = cas(channel).BatchUpdateBlobs(request)
    assert [r.status.code for r in response.responses] == [OK] * len(request.requests), response
    return [r.digest for r in request.requests]


def missing(channel: grpc.Channel, digests: Iterable[re_pb2.Digest], function: int = 0,
            instance: str = "") -> set[tuple[str, int]]:
    response = cas(channel).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, blob_digests=list(digests), digest_function=function))
    return {key(d) for d in response.missing_blob_digests}


def read_name(d: re_pb2.Digest, instance: str = "", function: str = "", compressor: str = "") -> str:
    parts = [instance] if instance else []
    parts += [f"compressed-blobs/{compressor}"] if compressor else ["blobs"]
    parts += [function] if function else []
    parts += [d.hash, str(d.size_bytes)]
    return "/".join(parts)


def write_name(d: re_pb2.Digest, instance: str = "", function: str = "", compressor: str = "",
               upload_id: str | None = None, metadata: str = "") -> str:
    prefix = f"{instance}/" if instance else ""
    name = f"{prefix}uploads/{upload_id or uuid.uuid4()}/" + read_name(d, function=function, compressor=compressor)
    return f"{name}/{metadata}" if metadata else name


def write_requests(name: str, data: bytes, chunk: int = 16 * 1024, start: int = 0,
                   finish: bool = True) -> Iterator[bs_pb2.WriteRequest]:
    """A Write stream as Bazel sends it: the resource name on the first message only."""
    offset = start
    first = True
    while True:
        piece = data[offset - start: offset - start + chunk] if chunk else data
        last = offset - start + len(piece) >= len(data)
        yield bs_pb2.WriteRequest(resource_name=name if first else "", write_offset=offset, data=piece,
                                  finish_write=finish and last)
        first = False
        offset += len(piece)
        if last:
            return


def bs_write(channel: grpc.Channel, name: str, data: bytes, chunk: int = 16 * 1024) -> bs_pb2.WriteResponse:
    return bs(channel).Write(write_requests(name, data, chunk), timeout=60)


def bs_read(channel: grpc.Channel, name: str, offset: int = 0, limit: int = 0) -> bytes:
    responses = bs(channel).Read(bs_pb2.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit),
                                 timeout=60)
    return b"".join(r.data for r in responses)
