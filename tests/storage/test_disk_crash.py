"""A server killed (SIGKILL) in the middle of a large upload restarts clean.

A real `casbah serve` process receives a 200 MiB ByteStream upload; once about
half has been sent and its temporary file is seen growing in data_dir/cas/tmp,
the process is killed.  The restarted server (same data directory) must not
serve a partial blob, must have emptied tmp/, and must still serve intact every
blob whose upload completed before the kill.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MiB = 1 << 20
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
BIG = 200 * MiB


def generated(size: int, seed: bytes) -> Iterator[bytes]:
    """`size` bytes in 1 MiB chunks, each a random block stamped with its index, so
    the client never holds the whole blob and no two chunks are alike."""
    block = seed * (MiB // len(seed))
    for index, pos in enumerate(range(0, size, MiB)):
        chunk = index.to_bytes(8, "little") + block[8:]
        yield chunk[: min(MiB, size - pos)]


def sha256_of(size: int, seed: bytes) -> re_pb2.Digest:
    h = hashlib.sha256()
    for chunk in generated(size, seed):
        h.update(chunk)
    return re_pb2.Digest(hash=h.hexdigest(), size_bytes=size)


def write_requests(digest: re_pb2.Digest, chunks: Iterator[bytes]) -> Iterator[bs_pb2.WriteRequest]:
    name = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size_bytes}"
    offset = 0
    for chunk in chunks:
        yield bs_pb2.WriteRequest(resource_name=name if offset == 0 else "", write_offset=offset, data=chunk)
        offset += len(chunk)
    yield bs_pb2.WriteRequest(resource_name=name if offset == 0 else "", write_offset=offset, finish_write=True)


def read_hash(stub: bs_grpc.ByteStreamStub, digest: re_pb2.Digest) -> str:
    h = hashlib.sha256()
    for response in stub.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")):
        h.update(response.data)
    return h.hexdigest()


def tmp_files(data_dir: Path) -> dict[str, int]:
    tmp = data_dir / "cas" / "tmp"
    sizes = {}
    for entry in os.scandir(tmp):
        try:
            sizes[entry.name] = entry.stat().st_size
        except FileNotFoundError:
            pass
    return sizes


def test_sigkill_mid_upload_leaves_no_partial_blob_and_keeps_complete_ones(start_server) -> None:
    server = start_server()
    data_dir = server.data_dir

    # Blobs uploaded completely before the crash, small to multi-chunk.
    complete = {}
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        bs = bs_grpc.ByteStreamStub(channel)
        for size in (100, 3 * MiB + 5, 20 * MiB):
            seed = os.urandom(64)
            digest = sha256_of(size, seed)
            response = bs.Write(write_requests(digest, generated(size, seed)))
            assert response.committed_size == size
            complete[digest.hash] = digest

    # The interrupted upload: after half, keep sending slowly until the kill.
    big_seed = os.urandom(64)
    big = sha256_of(BIG, big_seed)
    halfway = threading.Event()
    killed = threading.Event()
    outcome: dict[str, object] = {}

    def paced() -> Iterator[bytes]:
        sent = 0
        for chunk in generated(BIG, big_seed):
            if sent >= BIG // 2:
                halfway.set()
                if killed.is_set():
                    return
                time.sleep(0.02)
            yield chunk
            sent += len(chunk)

    channel = grpc.insecure_channel(server.address, options=OPTIONS)
    upload_name = f"uploads/{uuid.uuid4()}/blobs/{big.hash}/{big.size_bytes}"

    def upload() -> None:
        def requests() -> Iterator[bs_pb2.WriteRequest]:
            offset = 0
            for chunk in paced():
                yield bs_pb2.WriteRequest(
                    resource_name=upload_name if offset == 0 else "", write_offset=offset, data=chunk
                )
                offset += len(chunk)
            # Never finish_write: the kill comes first (or the stream just ends, unfinished).

        try:
            outcome["response"] = bs_grpc.ByteStreamStub(channel).Write(requests(), timeout=120)
        except grpc.RpcError as exc:
            outcome["error"] = exc.code()

    thread = threading.Thread(target=upload, daemon=True)
    thread.start()
    try:
        assert halfway.wait(120), "the upload never reached half its size"
        # Wait until the server's temporary file is really growing, then kill.
        deadline = time.monotonic() + 60
        previous: dict[str, int] = {}
        while True:
            assert time.monotonic() < deadline, "no growing temporary file in data_dir/cas/tmp"
            current = tmp_files(data_dir)
            if any(size > previous.get(name, size) and size >= 64 * MiB for name, size in current.items()):
                break
            previous = current
            time.sleep(0.05)
        server.kill()
    finally:
        killed.set()
        thread.join(60)
        channel.close()
    assert not thread.is_alive()
    assert "response" not in outcome, "the interrupted upload must not have completed"
    assert tmp_files(data_dir), "SIGKILL should have left the partial upload in tmp/ (cleaned at restart)"

    server.start()  # same data directory, same port
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        bs = bs_grpc.ByteStreamStub(channel)
        assert tmp_files(data_dir) == {}, "restart must remove partial uploads"
        missing = cas.FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=[big, *complete.values()])
        ).missing_blob_digests
        missing_hashes = {d.hash for d in missing}
        assert missing_hashes <= {big.hash}, "a blob uploaded completely before the kill was lost"
        if big.hash not in missing_hashes:  # complete is acceptable; corrupt is not
            assert read_hash(bs, big) == big.hash
        else:
            with pytest.raises(grpc.RpcError) as read_error:
                next(bs.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{big.hash}/{big.size_bytes}")))
            assert read_error.value.code() == grpc.StatusCode.NOT_FOUND
        for digest in complete.values():
            assert read_hash(bs, digest) == digest.hash
        # The upload session died with the process.
        with pytest.raises(grpc.RpcError) as query_error:
            bs.QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=upload_name))
        assert query_error.value.code() == grpc.StatusCode.NOT_FOUND
    files = data_dir / "cas" / "files" / big.hash[:2]
    partial = [p for p in files.iterdir() if p.name.startswith(big.hash)] if files.exists() else []
    assert all(p.stat().st_size == BIG for p in partial), "a partial object file survived the restart"
