"""Unit tests of casbah.reapi.plan: pure functions, so no server."""

from __future__ import annotations

import grpc

from casbah.digest import Digest, DigestFunction
from casbah.errors import code_from_int
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.reapi import plan


def _d(n: int, size: int = 10, fn: DigestFunction = DigestFunction.SHA256) -> Digest:
    return Digest(f"{n:064x}", size, fn)


def test_find_missing_groups_split_by_function_and_count() -> None:
    digests = [_d(1), _d(2, fn=DigestFunction.BLAKE3), _d(3), _d(4), _d(5)]
    groups = plan.find_missing_groups(digests, group=2)
    assert groups == [[_d(1), _d(3)], [_d(4), _d(5)], [_d(2, fn=DigestFunction.BLAKE3)]]
    assert all(len({d.function for d in g}) == 1 for g in groups)


def test_pack_batches_respects_limit_with_overhead_and_function() -> None:
    limit = 1000
    size = 1000 // 3 - plan.BLOB_OVERHEAD  # exactly three fit
    items = [_d(i, size) for i in range(7)] + [_d(99, size, DigestFunction.BLAKE3)]
    batches = plan.pack_batches(items, limit, lambda d: d)
    assert [len(b) for b in batches] == [3, 3, 1, 1]
    for batch in batches:
        assert sum(d.size + plan.BLOB_OVERHEAD for d in batch) <= limit
        assert len({d.function for d in batch}) == 1
    assert [d for b in batches for d in b] == items  # order kept


def test_small_large_cut_is_one_blob_alone_in_a_batch() -> None:
    limit = 4096
    edge = _d(1, limit - plan.BLOB_OVERHEAD)
    over = _d(2, limit - plan.BLOB_OVERHEAD + 1)
    assert plan.fits_batch(edge, limit) and not plan.fits_batch(over, limit)
    assert plan.split_by_size([edge, over], limit, lambda d: d) == ([edge], [over])


def test_overhead_covers_the_real_encoding_of_a_batch_entry() -> None:
    """The constant must cover what protobuf really spends per entry, at the largest sizes."""
    big = 2**32 - 1
    update = re_pb2.BatchUpdateBlobsRequest(requests=[re_pb2.BatchUpdateBlobsRequest.Request(
        digest=re_pb2.Digest(hash="f" * 64, size_bytes=2**62), data=b"x" * 1000, compressor=re_pb2.Compressor.ZSTD)])
    assert update.ByteSize() - 1000 <= plan.BLOB_OVERHEAD
    read = re_pb2.BatchReadBlobsResponse(responses=[re_pb2.BatchReadBlobsResponse.Response(
        digest=re_pb2.Digest(hash="f" * 64, size_bytes=big), data=b"x" * 1000, compressor=re_pb2.Compressor.ZSTD)])
    assert read.ByteSize() - 1000 <= plan.BLOB_OVERHEAD


def test_batch_limit_defaults_and_caps() -> None:
    assert plan.batch_limit(0, 64 << 20) == plan.SAFE_BATCH_SIZE
    assert plan.batch_limit(1 << 20, 64 << 20) == 1 << 20
    assert plan.batch_limit(1 << 30, 4 << 20) == (4 << 20) - plan.MESSAGE_SLACK


def test_resource_names() -> None:
    sha = _d(7, 42)
    b3 = _d(7, 42, DigestFunction.BLAKE3)
    assert plan.blob_resource("", sha) == f"blobs/{sha.hash}/42"
    assert plan.blob_resource("main", b3) == f"main/blobs/blake3/{b3.hash}/42"
    assert plan.blob_resource("a/b", sha, compressed=True) == f"a/b/compressed-blobs/zstd/{sha.hash}/42"
    assert plan.upload_resource("x", "u-1", b3, compressed=True) == \
        f"x/uploads/u-1/compressed-blobs/zstd/blake3/{b3.hash}/42"
    assert plan.upload_resource("", "u", sha) == f"uploads/u/blobs/{sha.hash}/42"


def test_code_from_int() -> None:
    assert code_from_int(0) is grpc.StatusCode.OK
    assert code_from_int(5) is grpc.StatusCode.NOT_FOUND
    assert code_from_int(15) is grpc.StatusCode.DATA_LOSS
    assert code_from_int(999) is grpc.StatusCode.UNKNOWN
