"""End-to-end: Bazel against a casbah edge in front of a central casbah.

The edge is `cache(disk, existence-cache(remote -> central))` with the ActionCache
forwarded to the central server, as in examples/edge-cache.yaml.  Bazel builds cold
through the edge (everything lands on the central server), the edge loses its disk
store, and a rebuild after `clean --expunge` is 100% remote cache hits served from
the central server through the edge, while the central server is down at the start
of that build and comes back only once the edge has started retrying.  Finally, with
the central server stopped, the edge still serves every output from its disk.

The helpers (workspace, stubs, build checks) are those of test_bazel.py.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
from test_bazel import (  # noqa: F401  (bazel, bazel_user_root: fixtures)
    BAZEL,
    OUTPUTS,
    Bazel,
    assert_server_log_clean,
    bazel,
    bazel_user_root,
    check_outputs_identical,
    cold_build,
    hash_outputs,
    warm_build,
)

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(BAZEL is None, reason="bazel is not installed (scripts/system-deps installs bazel-bootstrap)"),
]

OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


def edge_config(path: Path, central_url: str, fast_dir: Path) -> Path:
    path.write_text(f"""
storages:
  upstream: {{kind: remote, url: "{central_url}", retries: 30, max-backoff: 1}}
  fast: {{kind: disk, path: {fast_dir}, max-size: 2G}}
instances:
  "":
    storage: {{kind: cache, fast: fast, slow: {{kind: existence-cache, backend: upstream}}}}
    action-cache: {{kind: remote, url: "{central_url}", retries: 30, max-backoff: 1}}
    asset-index: memory
""")
    return path


def output_digests(bin_dir: Path) -> list[re_pb2.Digest]:
    return [re_pb2.Digest(hash=hashlib.sha256((bin_dir / rel).read_bytes()).hexdigest(),
                          size_bytes=(bin_dir / rel).stat().st_size) for rel in OUTPUTS]


def missing_on(address: str, digests: list[re_pb2.Digest]) -> list[re_pb2.Digest]:
    with grpc.insecure_channel(address, options=OPTIONS) as channel:
        response = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
            re_pb2.FindMissingBlobsRequest(blob_digests=digests))
    return list(response.missing_blob_digests)


def restart_when_edge_retries(central, edge, started: threading.Event, failures: list[BaseException]) -> None:
    """Start the (stopped) central server as soon as the edge logs its first retry."""
    before = edge.log().count("; retry 1/")
    try:
        deadline = time.monotonic() + 240
        while edge.log_path.read_text(errors="replace").count("; retry 1/") <= before:
            if time.monotonic() > deadline:
                raise TimeoutError("the edge never retried a call to the central server")
            time.sleep(0.05)
        started.set()
        central.start()
    except BaseException as exc:
        failures.append(exc)
        if central.proc is None:
            central.start()


def test_bazel_through_an_edge_with_the_central_server_restarting(bazel: Bazel, start_server,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    central = start_server()
    fast_dir = tmp_path / "edge-fast"
    edge = start_server(["--config", str(edge_config(tmp_path / "edge.yaml", central.url, fast_dir))])

    # Cold: every action runs locally and is uploaded through the edge to the central server.
    cold_build(bazel, edge.url)
    reference = hash_outputs(bazel.bin_dir)
    outputs = output_digests(bazel.bin_dir)
    assert missing_on(central.address, outputs) == []

    # The edge forgets everything local; the central server goes down.
    edge.stop()
    shutil.rmtree(fast_dir)
    edge.start()
    central.stop()
    bazel.clean_expunge()

    # Warm: the central server comes back only once the edge has had to retry, and the
    # build is still 100% remote cache hits with identical outputs.
    retried, failures = threading.Event(), []
    restarter = threading.Thread(target=restart_when_edge_retries, args=(central, edge, retried, failures))
    restarter.start()
    try:
        warm_build(bazel, edge.url)
    finally:
        restarter.join()
    assert not failures, failures
    assert retried.is_set()
    check_outputs_identical(bazel, reference)

    # The outputs came through the edge, which kept them: with the central server down,
    # the edge still serves every one of them.
    central.stop()
    with grpc.insecure_channel(edge.address, options=OPTIONS) as channel:
        stream = bs_grpc.ByteStreamStub(channel)
        for digest in outputs:
            if digest.size_bytes == 0:
                continue
            data = b"".join(r.data for r in stream.Read(bs_pb2.ReadRequest(
                resource_name=f"blobs/{digest.hash}/{digest.size_bytes}")))
            assert hashlib.sha256(data).hexdigest() == digest.hash
        batch = re_grpc.ContentAddressableStorageStub(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
            digests=[d for d in outputs if d.size_bytes < 1 << 20]))
        assert all(r.status.code == 0 for r in batch.responses)
    assert_server_log_clean(edge)
    assert_server_log_clean(central)
