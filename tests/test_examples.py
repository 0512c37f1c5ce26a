"""The proxy examples run as documented: `casbah serve --config examples/FILE`, with
their environment variables pointing at real casbah servers on loopback, and
clients pushing and reading through them.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import grpc
from google.protobuf import timestamp_pb2

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.storage.engine import stored_blobs

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
MiB = 1 << 20


class Client:
    """Plain stubs on one channel: what any REAPI client sends."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address, options=OPTIONS)
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bs = bs_grpc.ByteStreamStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.fetch = ra_grpc.FetchStub(self.channel)
        self.push = ra_grpc.PushStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def upload(self, blobs: list[tuple[Digest, bytes]]) -> None:
        request = re_pb2.BatchUpdateBlobsRequest(requests=[
            re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=data) for d, data in blobs])
        assert all(r.status.code == 0 for r in self.cas.BatchUpdateBlobs(request).responses)

    def write(self, digest: Digest, data: bytes) -> None:
        resource = f"uploads/{uuid.uuid4()}/blobs/{digest.hash}/{digest.size}"
        requests = (bs_pb2.WriteRequest(resource_name=resource, write_offset=pos, data=data[pos : pos + 64 * 1024],
                                        finish_write=pos + 64 * 1024 >= len(data))
                    for pos in range(0, len(data), 64 * 1024))
        assert self.bs.Write(requests).committed_size == digest.size

    def read(self, digest: Digest) -> bytes:
        stream = self.bs.Read(bs_pb2.ReadRequest(resource_name=f"blobs/{digest.hash}/{digest.size}"))
        return b"".join(r.data for r in stream)

    def batch_read(self, digests: list[Digest]) -> dict[Digest, bytes]:
        response = self.cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[d.to_proto() for d in digests]))
        return {Digest(r.digest.hash, r.digest.size_bytes): r.data for r in response.responses if r.status.code == 0}

    def missing(self, digests: list[Digest]) -> list[Digest]:
        response = self.cas.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[d.to_proto()
                                                                                          for d in digests]))
        gone = {(m.hash, m.size_bytes) for m in response.missing_blob_digests}
        return [d for d in digests if (d.hash, d.size) in gone]


def blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data), data


def test_edge_cache_example(start_server, tmp_path: Path) -> None:
    central = start_server()
    edge_dir = tmp_path / "edge"
    edge = start_server(["--config", str(EXAMPLES / "edge-cache.yaml")], data_dir=edge_dir,
                        env={"CASBAH_UPSTREAM": central.url, "CASBAH_DATA_DIR": str(edge_dir)})
    at_edge, at_central = Client(edge.address), Client(central.address)
    try:
        # Pushed through the edge: stored centrally and kept in the edge's disk store.
        small = [blob(n) for n in (10, 1000, 50_000)]
        big_digest, big = blob(3 * MiB + 1)
        at_edge.upload(small)
        at_edge.write(big_digest, big)
        pushed = [d for d, _ in small] + [big_digest]
        assert at_central.missing(pushed) == []
        assert at_edge.missing(pushed) == []
        local = set(stored_blobs(str(edge_dir / "edge")))
        assert {f"{d.hash}-{d.size}" for d in pushed} <= local
        assert at_edge.read(big_digest) == big
        assert at_edge.batch_read([d for d, _ in small]) == dict(small)

        # Pushed to the central server only: the edge serves it, and keeps a copy.
        direct_digest, direct = blob(2 * MiB)
        at_central.write(direct_digest, direct)
        assert at_edge.missing([direct_digest]) == []
        assert at_edge.read(direct_digest) == direct
        assert f"{direct_digest.hash}-{direct_digest.size}" in {p.name for p in (edge_dir / "edge").rglob("*-*")}
        absent = blob(7)[0]
        assert at_edge.missing([absent]) == [absent]

        # The ActionCache is the central one.
        action = blob(300)[0]
        result = re_pb2.ActionResult(exit_code=0, stdout_digest=small[0][0].to_proto(),
                                     output_files=[re_pb2.OutputFile(path="out/big", digest=big_digest.to_proto())])
        at_edge.ac.UpdateActionResult(re_pb2.UpdateActionResultRequest(action_digest=action.to_proto(),
                                                                       action_result=result))
        got = at_central.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
        assert got.output_files[0].digest == big_digest.to_proto()
        got = at_edge.ac.GetActionResult(re_pb2.GetActionResultRequest(action_digest=action.to_proto()))
        assert got.stdout_digest == small[0][0].to_proto()

        # So is the Remote Asset index.
        uri = f"https://example.com/{uuid.uuid4()}.tar.gz"
        expire = timestamp_pb2.Timestamp()
        expire.FromSeconds(4_000_000_000)
        at_edge.push.PushBlob(ra_pb2.PushBlobRequest(uris=[uri], blob_digest=big_digest.to_proto(),
                                                     qualifiers=[ra_pb2.Qualifier(name="resource_type",
                                                                                  value="application/x-tar")]))
        for client in (at_central, at_edge):
            fetched = client.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri]))
            assert fetched.status.code == 0 and fetched.blob_digest == big_digest.to_proto()
        miss = at_edge.fetch.FetchBlob(ra_pb2.FetchBlobRequest(uris=[uri + ".other"]))
        assert miss.status.code == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        at_edge.close()
        at_central.close()


def test_sharded_example(start_server, tmp_path: Path) -> None:
    shards = [start_server() for _ in range(3)]
    pool = start_server(["--config", str(EXAMPLES / "sharded.yaml")],
                        env={"CASBAH_SHARDS": ",".join(s.url for s in shards)})
    clients = [Client(s.address) for s in shards]
    at_pool = Client(pool.address)
    try:
        blobs = [blob(100 + i) for i in range(90)]
        big_digest, big = blob(2 * MiB + 3)
        at_pool.upload(blobs)
        at_pool.write(big_digest, big)
        digests = [d for d, _ in blobs] + [big_digest]
        # Each blob is on exactly one shard, and every shard got some.
        holders = [[d for d in digests if not c.missing([d])] for c in clients]
        assert sorted(d for held in holders for d in held) == sorted(digests)
        assert all(len(held) > 10 for held in holders), [len(h) for h in holders]
        assert at_pool.missing(digests) == []
        assert at_pool.batch_read([d for d, _ in blobs]) == dict(blobs)
        assert at_pool.read(big_digest) == big
    finally:
        at_pool.close()
        for c in clients:
            c.close()
