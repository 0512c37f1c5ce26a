"""The `remote` backend against another implementation: BuildGrid 0.9.1.

A casbah edge (examples/edge-cache.yaml: a local disk store in front of `remote`,
ActionCache forwarded) runs in front of a real BuildGrid on loopback; blobs and an
ActionResult go both ways through the edge and are checked on BuildGrid directly.

BuildGrid needs Python 3.13 and its own grpcio/protobuf, so it lives in a venv
outside the project's, made by `scripts/buildgrid-venv` (which `scripts/test`
runs); without it this test skips, saying so.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from buildgrid import start_buildgrid

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.storage.engine import stored_blobs

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
MiB = 1 << 20


@pytest.fixture
def buildgrid(tmp_path: Path) -> Iterator[str]:
    """BuildGrid (tests/buildgrid.py: the benchmark's config) on loopback; yields its address."""
    with start_buildgrid(tmp_path / "buildgrid") as bg:  # skips, naming scripts/buildgrid-venv, if missing
        yield bg.address


def test_edge_in_front_of_buildgrid(buildgrid: str, start_server, tmp_path: Path) -> None:
    edge_dir = tmp_path / "edge"
    edge = start_server(["--config", str(EXAMPLES / "edge-cache.yaml")], data_dir=edge_dir,
                        env={"CASBAH_UPSTREAM": f"grpc://{buildgrid}", "CASBAH_DATA_DIR": str(edge_dir)})
    with grpc.insecure_channel(edge.address, options=OPTIONS) as e, \
            grpc.insecure_channel(buildgrid, options=OPTIONS) as b:
        edge_cas, bg_cas = re_grpc.ContentAddressableStorageStub(e), re_grpc.ContentAddressableStorageStub(b)
        edge_bs, bg_bs = bs_grpc.ByteStreamStub(e), bs_grpc.ByteStreamStub(b)

        def missing(stub, digests: list[Digest]) -> list[Digest]:
            response = stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
                blob_digests=[d.to_proto() for d in digests]))
            gone = {(m.hash, m.size_bytes) for m in response.missing_blob_digests}
            return [d for d in digests if (d.hash, d.size) in gone]

        def write(stub, data: bytes) -> Digest:
            digest = Digest.of(data)
            resource = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}"
            step = 64 * 1024
            requests = (bs_pb2.WriteRequest(resource_name=resource, write_offset=pos, data=data[pos : pos + step],
                                            finish_write=pos + step >= len(data)) for pos in range(0, len(data), step))
            assert stub.Write(requests).committed_size == len(data)
            return digest

        def read(stub, digest: Digest) -> bytes:
            return b"".join(r.data for r in stub.Read(
                bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}")))

        # Up through the edge: batches and a ByteStream upload land in BuildGrid.
        small = [os.urandom(n) for n in (1, 500, 20_000, 200_000)]
        response = edge_cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=Digest.of(d).to_proto(), data=d) for d in small]))
        assert [r.status.code for r in response.responses] == [0] * len(small)
        big = os.urandom(5 * MiB + 11)
        big_digest = write(edge_bs, big)
        uploaded = [Digest.of(d) for d in small] + [big_digest]
        assert missing(bg_cas, uploaded) == []
        assert read(bg_bs, big_digest) == big

        # Down through the edge: a blob only BuildGrid has, by ByteStream and by batch.
        direct = os.urandom(3 * MiB)
        direct_digest = write(bg_bs, direct)
        direct_small = os.urandom(3000)
        bg_cas.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(requests=[re_pb2.BatchUpdateBlobsRequest.Request(
            digest=Digest.of(direct_small).to_proto(), data=direct_small)]))
        absent = Digest.of(os.urandom(10))
        assert missing(edge_cas, [direct_digest, Digest.of(direct_small), absent]) == [absent]
        assert read(edge_bs, direct_digest) == direct
        batch = edge_cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[
            Digest.of(direct_small).to_proto(), absent.to_proto(), *(Digest.of(d).to_proto() for d in small)]))
        by_hash = {r.digest.hash: r for r in batch.responses}
        assert by_hash[Digest.of(direct_small).hash].data == direct_small
        assert by_hash[absent.hash].status.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert all(by_hash[Digest.of(d).hash].data == d for d in small)
        kept = set(stored_blobs(str(edge_dir / "edge")))
        assert f"{direct_digest.hash}-{direct_digest.size}" in kept  # the read filled the edge's disk

        # An ActionResult written through the edge is BuildGrid's, and reads back through the edge.
        action = Digest.of(os.urandom(140))
        result = re_pb2.ActionResult(exit_code=0, stdout_digest=Digest.of(small[1]).to_proto(),
                                     output_files=[re_pb2.OutputFile(path="out.bin", digest=big_digest.to_proto())])
        re_grpc.ActionCacheStub(e).UpdateActionResult(re_pb2.UpdateActionResultRequest(
            action_digest=action.to_proto(), action_result=result))
        from_bg = re_grpc.ActionCacheStub(b).GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=action.to_proto()))
        assert from_bg.output_files[0].digest == big_digest.to_proto()
        from_edge = re_grpc.ActionCacheStub(e).GetActionResult(re_pb2.GetActionResultRequest(
            action_digest=action.to_proto()))
        assert from_edge.output_files == result.output_files and from_edge.stdout_digest == result.stdout_digest
        with pytest.raises(grpc.RpcError) as info:
            re_grpc.ActionCacheStub(e).GetActionResult(re_pb2.GetActionResultRequest(
                action_digest=Digest.of(os.urandom(9)).to_proto()))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    log = edge.log()
    assert "Traceback" not in log and " ERROR " not in log, log
