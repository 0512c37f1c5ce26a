"""GetCapabilities: what casbah advertises must be true, since clients plan their traffic on it.

Bazel and buildbox-casd size their batches from `max_batch_total_size_bytes`, pick
compression from the compressor lists and refuse a cache without `update_enabled`;
an over-generous batch limit turns into failed uploads mid-build.
"""

from __future__ import annotations

import grpc
import pytest
from server_test_helpers import (
    BLAKE3,
    OK,
    OPTIONS,
    SHA256,
    ZSTD,
    caps,
    cas,
    missing,
    rand,
    rpc_error,
    sha,
    update_request,
    upload,
)

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2


def get(channel: grpc.Channel, instance: str = "") -> re_pb2.ServerCapabilities:
    return caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=instance))


def test_digest_functions_and_compressors(mchannel) -> None:
    """By default every function casbah computes but the legacy SHA1 and MD5; zstd for
    ByteStream and for batch uploads; content-defined chunking at the REAPI's default FastCDC parameters."""
    cache = get(mchannel).cache_capabilities
    f = re_pb2.DigestFunction
    assert list(cache.digest_functions) == [SHA256, f.SHA384, f.SHA512, f.SHA256TREE, BLAKE3, f.GITSHA1]
    assert cache.split_blob_support and cache.splice_blob_support
    assert (cache.fast_cdc_2020_params.avg_chunk_size_bytes, cache.fast_cdc_2020_params.seed) == (512 * 1024, 0)
    assert list(cache.supported_compressors) == [ZSTD]
    assert list(cache.supported_batch_update_compressors) == [ZSTD]


def test_api_versions_and_update_enabled(mchannel) -> None:
    """Bazel rejects a server whose version range excludes 2.0; update_enabled lets it write."""
    response = get(mchannel)
    low, high = response.low_api_version, response.high_api_version
    assert (low.major, low.minor) == (2, 0)
    assert (high.major, high.minor) >= (2, 3)
    assert response.cache_capabilities.action_cache_update_capabilities.update_enabled
    assert not response.execution_capabilities.exec_enabled


def test_extra_instance_is_served(mchannel) -> None:
    """Names added with --instance answer GetCapabilities like the default one."""
    assert get(mchannel, "a/b/c").cache_capabilities.max_batch_total_size_bytes > 0


def test_unknown_instance_names_served_instances(mchannel) -> None:
    """A typo in a client's instance name must be diagnosable from the error alone."""
    error = rpc_error(lambda: get(mchannel, "nope"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in error.details()
    assert "'a/b/c'" in error.details() and "''" in error.details()


def _split(total: int, parts: int) -> list[bytes]:
    sizes = [total // parts] * parts
    sizes[-1] += total - sum(sizes)
    return [rand(n) for n in sizes]


@pytest.mark.parametrize("parts", [1, 200, 4000])
def test_max_batch_size_is_accepted(mserver, parts: int) -> None:
    """A batch upload of exactly the advertised size is accepted from a client with default gRPC limits.

    With one big blob and with many small ones (more protobuf overhead per byte).
    """
    with grpc.insecure_channel(mserver.address) as channel:  # default (4 MiB receive) limits
        limit = get(channel).cache_capabilities.max_batch_total_size_bytes
        assert 0 < limit <= 4 << 20
        blobs = _split(limit, parts)
        digests = [sha(b) for b in blobs]
        response = cas(channel).BatchUpdateBlobs(update_request(blobs))
        assert [r.status.code for r in response.responses] == [OK] * parts
        assert not missing(channel, digests)


@pytest.mark.parametrize("parts", [
    1,
    200,
    1000,
])
def test_max_batch_size_is_readable_by_default_client(mserver, parts: int) -> None:
    """A BatchReadBlobs of exactly the advertised size reaches a client with default gRPC limits.

    The reading side is the one that bites: the response carries per-blob digests
    and statuses on top of the data, and a default client refuses anything over 4 MiB.
    """
    with grpc.insecure_channel(mserver.address, options=OPTIONS) as big, grpc.insecure_channel(
            mserver.address) as channel:
        limit = get(channel).cache_capabilities.max_batch_total_size_bytes
        blobs = _split(limit, parts)
        digests = upload(big, blobs)
        read = cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests))
        assert [r.data for r in read.responses] == blobs


def test_over_max_batch_size_is_rejected(mchannel) -> None:
    """One byte over the advertised limit fails the whole call with INVALID_ARGUMENT, storing nothing."""
    limit = get(mchannel).cache_capabilities.max_batch_total_size_bytes
    blobs = _split(limit + 1, 3)
    digests = [sha(b) for b in blobs]
    error = rpc_error(lambda: cas(mchannel).BatchUpdateBlobs(update_request(blobs)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(missing(mchannel, digests)) == 3
    error = rpc_error(lambda: cas(mchannel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=digests)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_read_only_instance_reports_update_disabled(start_server, tmp_path) -> None:
    """Bazel must learn from capabilities that it cannot write to a read-only cache."""
    config = tmp_path / "casbah.yaml"
    config.write_text('instances: {"": {read-only: true}}\n')
    server = start_server(["--config", str(config)])
    with grpc.insecure_channel(server.address) as channel:
        assert not get(channel).cache_capabilities.action_cache_update_capabilities.update_enabled

