"""`serve --workers 2` on disk storage: every worker sees what any worker stored."""

from __future__ import annotations

import hashlib
import os
import time

import grpc

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc


def test_blobs_stored_by_one_worker_are_found_by_all(start_server) -> None:
    server = start_server(args=["--workers", "2"])
    blobs = [os.urandom(1000 + i) for i in range(50)]
    digests = [re_pb2.Digest(hash=hashlib.sha256(b).hexdigest(), size_bytes=len(b)) for b in blobs]
    with grpc.insecure_channel(server.address) as ch:
        requests = [re_pb2.BatchUpdateBlobsRequest.Request(digest=d, data=b)
                    for d, b in zip(digests, blobs, strict=True)]
        response = re_grpc.ContentAddressableStorageStub(ch).BatchUpdateBlobs(
            re_pb2.BatchUpdateBlobsRequest(requests=requests))
        assert all(r.status.code == 0 for r in response.responses)
    # Fresh connections land on either worker (SO_REUSEPORT); none may report the blobs
    # missing, immediately and a second later (every worker opens the one LMDB store).
    for pause in (0.0, 1.0):
        time.sleep(pause)
        for _ in range(8):
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                cas = re_grpc.ContentAddressableStorageStub(ch)
                missing = cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=digests))
                assert list(missing.missing_blob_digests) == []
                read = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests[:5]))
                assert [r.data for r in read.responses] == blobs[:5]
