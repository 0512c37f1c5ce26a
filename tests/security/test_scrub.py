"""`casbah admin scrub`: re-hash stored blobs at a bounded rate, remove and report corrupt ones."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import grpc
import pytest
from security_helpers import OPTIONS, Casbah, cli, free_port

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.storage.engine import Engine
from casbah.storage.engine.index import Record, key_of, seq_key


def serve(launch, data_dir: Path, *args: str) -> Casbah:
    return launch(["--listen", f"127.0.0.1:{free_port()}", "--data-dir", str(data_dir), *args])


def upload(server: Casbah, blobs: list[bytes], instance: str = "") -> list[re_pb2.Digest]:
    digests = []
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        for data in blobs:
            digest = re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
            response = cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(instance_name=instance, requests=[
                re_pb2.BatchUpdateBlobsRequest.Request(digest=digest, data=data)]), timeout=30)
            assert response.responses[0].status.code == 0
            digests.append(digest)
    return digests


def stored(data_dir: Path, digest: re_pb2.Digest) -> bytes | None:
    """Whether the stopped server's store still has a blob (its record, or None)."""
    engine = Engine(data_dir / "cas")
    try:
        with engine.env.meta_env.begin(db=engine.env.meta) as txn:
            return txn.get(key_of(Digest(digest.hash, digest.size_bytes)))
    finally:
        engine.close()


def flip_byte(data_dir: Path, digest: re_pb2.Digest) -> None:
    """Bit rot in a small (inline) blob: its last byte changes, the size does not."""
    engine = Engine(data_dir / "cas")
    env = engine.env
    try:
        with env.begin(write=True) as txn:
            where = seq_key(Record.unpack(txn.get(key_of(Digest(digest.hash, digest.size_bytes)), db=env.meta)).seq)
            value = bytearray(txn.get(where, db=env.order))
            value[-1] ^= 0xFF
            txn.put(where, bytes(value), db=env.order)
    finally:
        engine.close()


def scrub(data_dir: Path, *args: str):
    return cli("admin", "scrub", "--data-dir", str(data_dir), *args, timeout=120)


def report_seconds(output: str) -> float:
    return float(re.search(r"scanned \d+ blobs \([^)]*\) in ([0-9.]+)s", output).group(1))


def test_scrub_removes_corrupt_blob(launch, tmp_path: Path) -> None:
    """A flipped byte is found, reported by digest, removed (exit 1); --dry-run only reports;
    a second scrub is clean (exit 0); the server afterwards reports the blob missing, so a
    client uploads it again instead of being served rotten bytes."""
    data_dir = tmp_path / "data"
    server = serve(launch, data_dir, "--instance", "A")
    blobs = [os.urandom(1000 + i) for i in range(6)]
    digests = upload(server, blobs)
    assert server.stop() == 0
    bad = digests[2]
    flip_byte(data_dir, bad)

    dry = scrub(data_dir, "--dry-run")
    assert dry.returncode == 1, dry.stdout + dry.stderr
    assert "scanned 6 blobs" in dry.stdout and "1 corrupt, 0 removed" in dry.stdout
    assert f"corrupt: {bad.hash}/{bad.size_bytes}\n" in dry.stdout
    assert stored(data_dir, bad) is not None
    # Instances '' and 'A' share one storage: it is scrubbed once.
    assert dry.stdout.count("scanned") == 1

    first = scrub(data_dir, "--rate", "0")
    assert first.returncode == 1, first.stdout + first.stderr
    assert "scanned 6 blobs" in first.stdout and "1 corrupt, 1 removed" in first.stdout
    assert f"corrupt: {bad.hash}/{bad.size_bytes} (removed)" in first.stdout
    assert f"{bad.hash}" in first.stderr and "is corrupt" in first.stderr  # the warning log line
    assert stored(data_dir, bad) is None

    second = scrub(data_dir)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "scanned 5 blobs" in second.stdout and "0 corrupt" in second.stdout

    server = serve(launch, data_dir)
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        cas = re_grpc.ContentAddressableStorageStub(channel)
        missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests), timeout=10)
        assert list(missing.missing_blob_digests) == [bad]
        read = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests), timeout=10)
        assert [r.data for r in read.responses if r.status.code == 0] == blobs[:2] + blobs[3:]


@pytest.mark.parametrize("rate", ["10M"])
def test_scrub_rate_limit(launch, tmp_path: Path, rate: str) -> None:
    """--rate bounds the read speed, so a scrub beside a busy server does not starve builds:
    20 MiB at 10M/s takes about 2 s, unlimited a fraction of that."""
    data_dir = tmp_path / "data"
    server = serve(launch, data_dir)
    upload(server, [os.urandom(1 << 20) for _ in range(20)])
    assert server.stop() == 0
    limited = scrub(data_dir, "--rate", rate)
    assert limited.returncode == 0, limited.stdout + limited.stderr
    assert "scanned 20 blobs (20 MiB)" in limited.stdout
    assert report_seconds(limited.stdout) >= 1.5
    unlimited = scrub(data_dir, "--rate", "0")
    assert unlimited.returncode == 0
    assert report_seconds(unlimited.stdout) < 1.5


def test_scrub_bad_arguments(tmp_path: Path) -> None:
    result = scrub(tmp_path / "data", "--rate", "fast")
    assert result.returncode != 0
    assert "--rate" in result.stderr and "not a size" in result.stderr
