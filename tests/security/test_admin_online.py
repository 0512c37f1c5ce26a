"""Online maintenance: `casbah admin scrub|stats|gc --remote` run inside the server (its
Admin service), so FindMissingBlobs stays truthful; on a data directory a server holds,
the same commands refuse instead of changing files behind the server's back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
from security_helpers import OPTIONS, Casbah, cli, free_port

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.storage.engine import Engine
from casbah.storage.engine.index import Record, key_of, seq_key


def serve(launch, data_dir: Path, *args: str) -> Casbah:
    return launch(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir), *args])


def digest_of(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload(cas: re_grpc.ContentAddressableStorageStub, blobs: list[bytes]) -> list[re_pb2.Digest]:
    requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=digest_of(b), data=b) for b in blobs]
    response = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=requests), timeout=30)
    assert [r.status.code for r in response.responses] == [0] * len(blobs)
    return [r.digest for r in requests]


def missing(cas: re_grpc.ContentAddressableStorageStub, digests: list[re_pb2.Digest]) -> list[re_pb2.Digest]:
    return list(cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests), timeout=10)
                .missing_blob_digests)


def rot_inline(store: Path, digest: re_pb2.Digest) -> None:
    """Bit rot in an inline blob, written as the disk would: under the server, which does not know."""
    engine = Engine(store)
    env = engine.env
    try:
        with env.begin(write=True) as txn:
            record = Record.unpack(txn.get(key_of(Digest(digest.hash, digest.size_bytes)), db=env.meta))
            value = bytearray(txn.get(seq_key(record.seq), db=env.order))
            value[-1] ^= 0xFF
            txn.put(seq_key(record.seq), bytes(value), db=env.order)
    finally:
        engine.close()


def rot_file(store: Path, digest: re_pb2.Digest) -> None:
    """Bit rot in a blob stored as a file (same size, one byte changed)."""
    path = next((store / "files").rglob(f"{digest.hash}-{digest.size_bytes}"))
    with open(path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_scrub_through_the_server_keeps_find_missing_truthful(launch, tmp_path: Path) -> None:
    """Corrupt an inline and a file blob under a running server; `admin scrub --remote` finds
    and removes both inside the server, FindMissingBlobs reports exactly those missing at once,
    and a re-upload repairs them."""
    data_dir = tmp_path / "data"
    server = serve(launch, data_dir)
    blobs = [os.urandom(1000 + i) for i in range(5)] + [os.urandom(200_000)]  # the last one is a file
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        digests = upload(cas, blobs)
        rot_inline(data_dir / "cas", digests[1])
        rot_file(data_dir / "cas", digests[5])
        assert missing(cas, digests) == []  # the server cannot know yet

        done = cli("admin", "scrub", "--remote", server.url, "--rate", "0")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "scanned 6 blobs" in done.stdout and "2 corrupt, 2 removed" in done.stdout, done.stdout
        for bad in (digests[1], digests[5]):
            assert f"corrupt: {bad.hash}/{bad.size_bytes} (removed)" in done.stdout
        assert missing(cas, digests) == [digests[1], digests[5]]

        upload(cas, [blobs[1], blobs[5]])
        assert missing(cas, digests) == []
        read = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests[:5]), timeout=10)
        assert [r.data for r in read.responses] == blobs[:5]
        clean = cli("admin", "scrub", "--remote", server.url)
        assert clean.returncode == 0 and "scanned 6 blobs" in clean.stdout and "0 corrupt" in clean.stdout


def test_stats_and_gc_through_the_server(launch, tmp_path: Path) -> None:
    """`admin stats --remote` counts what the server stores; `admin gc --remote --target`
    evicts inside the server, and FindMissingBlobs agrees with it."""
    server = serve(launch, tmp_path / "data")
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        digests = upload(cas, [os.urandom(4000) for _ in range(20)])
        stats = cli("admin", "stats", "--remote", server.url)
        assert stats.returncode == 0, stats.stderr
        assert "storages.default (disk):" in stats.stdout and " objects=20 " in stats.stdout, stats.stdout
        gc = cli("admin", "gc", "--remote", server.url, "--target", "20K")
        assert gc.returncode == 0, gc.stderr
        removed = int(gc.stdout.split()[1])
        assert removed >= 15, gc.stdout
        assert len(missing(cas, digests)) == removed


def test_local_commands_refuse_while_a_server_holds_the_store(launch, tmp_path: Path) -> None:
    """`admin scrub|stats|gc|migrate --data-dir` beside a running server: one clear line, exit 1,
    nothing changed; once the server stopped, they run."""
    data_dir = tmp_path / "data"
    server = serve(launch, data_dir)
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        upload(re_grpc.ContentAddressableStorageStub(channel), [b"kept"])
    for command in ("scrub", "stats", "gc", "migrate"):
        refused = cli("admin", command, "--data-dir", str(data_dir))
        assert refused.returncode == 1, (command, refused.stdout, refused.stderr)
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "is open in a running server" in lines[0], (command, refused.stderr)
        assert refused.stdout == ""
        assert command == "migrate" or f"admin {command} --remote URL" in lines[0]
    assert server.stop() == 0
    stats = cli("admin", "stats", "--data-dir", str(data_dir))
    assert stats.returncode == 0 and " objects=1 " in stats.stdout, stats.stdout + stats.stderr
