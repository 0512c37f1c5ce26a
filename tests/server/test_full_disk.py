"""A data directory that fills up: every write answers RESOURCE_EXHAUSTED naming the store,
reads go on, the log has one line per refused call (no tracebacks), audit lines say how
the write ended, and writes succeed again once space returns.

The disk is a real, small tmpfs (mounting needs root: skipped otherwise), filled by a
filler file, with the default disk storage and the SQLite asset index on it.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import grpc
import pytest
from server_test_helpers import OPTIONS, ac, bs, cas, rand, rpc_error, sha, write_requests

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.fixture
def small_disk(tmpfs) -> Path:
    """A 12 MiB tmpfs, unmounted afterwards."""
    return tmpfs("12m")


def fill(path: Path) -> None:
    """Write `path` until the filesystem is full."""
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * (64 << 10)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        # Smaller pieces for the last bytes, so even a small write finds no room.
        try:
            while True:
                f.write(b"\0" * 512)
        except OSError:
            pass


def push_request(uri_seed: str, blob: re_pb2.Digest) -> ra_pb2.PushBlobRequest:
    # Many long URIs: a record far larger than any free page SQLite may still have.
    uris = [f"https://example.com/{uri_seed}/{i}/{'x' * 2000}" for i in range(64)]
    return ra_pb2.PushBlobRequest(uris=uris, blob_digest=blob)


def test_full_disk_refuses_writes_keeps_reads_and_recovers(start_server, small_disk: Path, tmp_path: Path) -> None:
    server = start_server(data_dir=small_disk / "data", log_path=tmp_path / "casbah.log")  # the log off the tmpfs
    stored = rand(1000)
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        response = cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=sha(stored), data=stored)]), timeout=10)
        assert response.responses[0].status.code == 0
        ra_grpc.PushStub(channel).PushBlob(push_request("before", sha(stored)), timeout=10)

        fill(small_disk / "filler")

        big = rand(300_000)
        response = cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=sha(big), data=big)]), timeout=10)
        status = response.responses[0].status
        assert status.code == EXHAUSTED.value[0], status
        assert "no space" in status.message.lower() or "No space" in status.message, status

        large = rand(3 << 20)
        name = f"uploads/{uuid.uuid4()}/blobs/{sha(large).hash}/{len(large)}"
        err = rpc_error(lambda: bs(channel).Write(write_requests(name, large, chunk=1 << 20), timeout=20))
        assert err.code() == EXHAUSTED, err.details()

        action = sha(rand(32))
        result = re_pb2.ActionResult(exit_code=0, stdout_raw=rand(300_000))
        err = rpc_error(lambda: ac(channel).UpdateActionResult(
            re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result), timeout=10))
        assert err.code() == EXHAUSTED, err.details()

        err = rpc_error(lambda: ra_grpc.PushStub(channel).PushBlob(push_request("full", sha(stored)), timeout=10))
        assert err.code() == EXHAUSTED, err.details()
        assert "asset index" in err.details() and "no space" in err.details(), err.details()
        assert "rollback" not in err.details()

        keys = [f"{'k' * 2000}{i}" for i in range(64)]
        empty_tree = sha(b"")
        err = rpc_error(lambda: bst_grpc.ReferenceStorageStub(channel).UpdateReference(
            bst_pb2.UpdateReferenceRequest(keys=keys, digest=empty_tree), timeout=10))
        assert err.code() == EXHAUSTED, err.details()

        # Reads go on.
        read = cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[sha(stored)]), timeout=10)
        assert read.responses[0].data == stored
        fetched = ra_grpc.FetchStub(channel).FetchBlob(ra_pb2.FetchBlobRequest(
            uris=[push_request("before", sha(stored)).uris[0]]), timeout=10)
        assert fetched.status.code == 0 and fetched.blob_digest == sha(stored)

        # Space returns: the same writes succeed, without a restart.
        os.unlink(small_disk / "filler")
        response = cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=sha(big), data=big)]), timeout=10)
        assert response.responses[0].status.code == 0, response.responses[0].status
        bs(channel).Write(write_requests(f"uploads/{uuid.uuid4()}/blobs/{sha(large).hash}/{len(large)}", large,
                                         chunk=1 << 20), timeout=20)
        ac(channel).UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result),
                                       timeout=10)
        ra_grpc.PushStub(channel).PushBlob(push_request("after", sha(stored)), timeout=10)
        bst_grpc.ReferenceStorageStub(channel).UpdateReference(
            bst_pb2.UpdateReferenceRequest(keys=keys, digest=empty_tree), timeout=10)
    time.sleep(0.2)
    log = (tmp_path / "casbah.log").read_text()
    assert "Traceback" not in log, log
    assert not re.search(r"INTERNAL", log), log
    refusals = [line for line in log.splitlines() if "RESOURCE_EXHAUSTED" in line and "WARNING" in line
                and "casbah.audit" not in line]
    assert len(refusals) == 5, "\n".join(refusals)  # one line per refused call
    assert all("no space left" in line for line in refusals), refusals
    # Audit lines record how each write ended.
    assert re.search(r"WRITE PushBlob on instance '' \S+/full/0/x+ .*: RESOURCE_EXHAUSTED\b", log), log
    assert re.search(r"WRITE PushBlob on instance '' \S+/after/0/x+ .*: OK\b", log), log
    assert re.search(rf"WRITE BatchUpdateBlobs on instance '' {sha(big).hash}/300000 .*: RESOURCE_EXHAUSTED 1\b",
                     log), log
    assert re.search(r"WRITE ByteStream.Write .*: RESOURCE_EXHAUSTED\b", log), log
    assert re.search(r"WRITE UpdateActionResult .*: RESOURCE_EXHAUSTED\b", log), log
