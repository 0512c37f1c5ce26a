"""Issue 11, row 5: an edge cache whose upstream answers reads with wrong bytes of the
right length must not serve them.

A real `casbah serve --config examples/edge-cache.yaml` (a `cache` of local disk in
front of a `remote` upstream) points at `lying_upstream.LyingUpstream`.  Before the
fix the edge refused to cache the wrong bytes but served them with OK, batch and
stream; now a client gets DATA_LOSS for those blobs (per blob in a batch, the
others still served) and the edge's disk holds none of them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from lying_upstream import LyingUpstream
from remote_helpers import MiB, blob

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.storage.engine import stored_blobs

ROOT = Path(__file__).resolve().parent.parent.parent
OPTIONS = [("grpc.max_receive_message_length", 64 * MiB)]


def stored_names(directory: Path) -> str:
    """The storage keys the edge's disk store holds (read through the engine: LMDB readers
    are safe beside the serving process)."""
    if not (directory / "index").exists() and not any(directory.glob("*")):
        return ""
    return "\n".join(stored_blobs(str(directory)))


def test_edge_answers_data_loss_for_what_a_lying_upstream_sends(start_server, tmp_path: Path) -> None:
    good, good_data = blob(1000)
    small, small_data = blob(2000)
    large, large_data = blob(3 * MiB + 1)
    with LyingUpstream() as liar:
        liar.add(good, good_data)
        liar.add(small, small_data, lie=True)
        liar.add(large, large_data, lie=True)
        data_dir = tmp_path / "edge-data"
        edge = start_server(["--config", str(ROOT / "examples" / "edge-cache.yaml")], data_dir=data_dir,
                            env={"CASBAH_UPSTREAM": liar.url, "CASBAH_DATA_DIR": str(data_dir),
                                 "CASBAH_EDGE_SIZE": "1G"})
        with grpc.insecure_channel(edge.address, options=OPTIONS) as channel:
            cas = re_grpc.ContentAddressableStorageStub(channel)
            response = cas.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[good.to_proto(), small.to_proto()]))
            by_hash = {r.digest.hash: r for r in response.responses}
            assert by_hash[good.hash].status.code == grpc.StatusCode.OK.value[0]
            assert by_hash[good.hash].data == good_data
            lost = by_hash[small.hash]
            assert lost.status.code == grpc.StatusCode.DATA_LOSS.value[0], lost.status
            assert not lost.data and small.hash in lost.status.message and liar.address in lost.status.message

            bytestream = bs_grpc.ByteStreamStub(channel)
            for digest in (small, large):
                received = 0
                with pytest.raises(grpc.RpcError) as caught:
                    for message in bytestream.Read(bs_pb2.ReadRequest(
                            resource_name=f"blobs/{digest.hash}/{digest.size}")):
                        received += len(message.data)
                assert caught.value.code() == grpc.StatusCode.DATA_LOSS, caught.value.details()
                assert digest.hash in caught.value.details()
                assert received < digest.size  # never the whole (wrong) blob

        # The good blob reaches the edge's disk (copied in the background); the others never.
        edge_store = data_dir / "edge"
        deadline = time.monotonic() + 10
        while good.hash not in stored_names(edge_store) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert good.hash in stored_names(edge_store)
        edge.stop()
        names = stored_names(edge_store)
        assert small.hash not in names and large.hash not in names
        assert os.path.isdir(edge_store)
