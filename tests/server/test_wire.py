"""The hand-encoded BatchReadBlobsResponse and ReadResponse (server/wire.py) are byte for byte what
protobuf serializes for the same response, and decodes to it: every field shape a
response can take (served, compressed, empty blob, NOT_FOUND, DATA_LOSS with a
message, multi-byte lengths, other digest functions).  The server path itself is
covered over gRPC by test_cas.py and tests/storage/test_verify_on_read.py."""

from __future__ import annotations

import hashlib
import os

from google.rpc import code_pb2, status_pb2

from casbah.digest import Digest, DigestFunction
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.server.interceptor import _batch_read_bytes
from casbah.server.wire import encode_batch_read, encode_missing, encode_read

ZSTD = re_pb2.Compressor.ZSTD


def digest(data: bytes, function: DigestFunction = DigestFunction.SHA256) -> Digest:
    hasher = hashlib.sha512 if function is DigestFunction.SHA512 else hashlib.sha256
    return Digest(hasher(data).hexdigest(), len(data), function)


def expected(digests, found, statuses, packed) -> re_pb2.BatchReadBlobsResponse:
    response = re_pb2.BatchReadBlobsResponse()
    for d in digests:
        entry = response.responses.add()
        entry.digest.hash = d.hash
        entry.digest.size_bytes = d.size
        if d in packed:
            entry.data, entry.compressor = packed[d], ZSTD
        elif d in found:
            entry.data = found[d]
        else:
            entry.status.CopyFrom(statuses.get(d, status_pb2.Status(code=code_pb2.NOT_FOUND)))
    return response


def test_every_entry_shape_encodes_as_protobuf_does() -> None:
    small, mid, big = os.urandom(100), os.urandom(200), os.urandom(70_000)
    wide = os.urandom(20)
    packed = b"\x28\xb5\x2f\xfd" + os.urandom(300)  # stands for zstd bytes: the encoder does not look
    empty = digest(b"")
    lost, absent = digest(os.urandom(10)), digest(os.urandom(11))
    huge = os.urandom(3 << 20)  # a length past the encoder's short cuts
    empty512 = digest(b"", DigestFunction.SHA512)  # a digest field over 127 bytes
    digests = [digest(small), absent, empty, digest(mid), lost, digest(big),
               digest(wide, DigestFunction.SHA512), digest(packed + b"x"), empty512, digest(huge)]
    found = {digests[0]: small, empty: b"", digests[3]: mid, digests[5]: big, digests[6]: wide,
             digests[7]: packed + b"x", empty512: b"", digests[9]: huge}
    zstd = {digests[7]: packed}
    statuses = {lost: status_pb2.Status(code=code_pb2.DATA_LOSS, message="blob é " + "x" * 300)}
    encoded = encode_batch_read(digests, found, statuses, zstd)
    want = expected(digests, found, statuses, zstd)
    assert encoded.wire == want.SerializeToString()
    decoded = re_pb2.BatchReadBlobsResponse.FromString(encoded.wire)
    assert decoded == want
    assert [r.status.code for r in decoded.responses] == [
        code_pb2.OK, code_pb2.NOT_FOUND, code_pb2.OK, code_pb2.OK, code_pb2.DATA_LOSS, code_pb2.OK, code_pb2.OK,
        code_pb2.OK, code_pb2.OK, code_pb2.OK]
    assert decoded.responses[4].status.message.startswith("blob é")
    assert decoded.responses[7].compressor == ZSTD and decoded.responses[7].data == packed
    assert encoded.payload_bytes == sum(len(zstd.get(d, data)) for d, data in found.items())
    assert _batch_read_bytes(encoded) == _batch_read_bytes(want)  # metrics count the same bytes


def test_an_empty_batch_is_an_empty_message() -> None:
    encoded = encode_batch_read([], {}, {})
    assert encoded.wire == b"" and encoded.payload_bytes == 0
    assert not re_pb2.BatchReadBlobsResponse.FromString(encoded.wire).responses


def test_read_responses_encode_as_protobuf_does_from_bytes_and_views() -> None:
    from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2

    chunk = os.urandom(300_000)
    for piece in (chunk[:1], chunk[:127], chunk[:128], memoryview(chunk)[1000:263_144], chunk):
        encoded = encode_read(piece)
        assert encoded.wire == bs_pb2.ReadResponse(data=bytes(piece)).SerializeToString()
        assert bs_pb2.ReadResponse.FromString(encoded.wire).data == bytes(piece)
        assert encoded.payload_bytes == len(piece)
    assert encode_read(b"").wire == b""


def _fmb(instance: str, digests: list[Digest], function: int = 0,
         unknown: bytes = b"") -> re_pb2.FindMissingBlobsRequest:
    request = re_pb2.FindMissingBlobsRequest(instance_name=instance, digest_function=function)
    for d in digests:
        request.blob_digests.add(hash=d.hash, size_bytes=d.size)
    if unknown:
        request.blob_digests[0].MergeFromString(unknown)
    return request


def test_a_findmissing_response_cut_from_the_request_is_what_protobuf_serializes() -> None:
    """Instance names or none, sizes of every varint length (0 too), functions with other
    hash lengths, the digest_function field after the digests, any subset missing."""
    sizes = [0, 1, 127, 128, 16383, 16384, (1 << 21) + 5, 1 << 40]
    for function, hex_len in ((DigestFunction.SHA256, 64), (DigestFunction.SHA1, 40), (DigestFunction.MD5, 32),
                              (DigestFunction.SHA384, 96)):
        digests = [Digest(hashlib.sha512(b"%d" % i).hexdigest()[:hex_len], sizes[i % len(sizes)], function)
                   for i in range(40)]
        for instance, pick in (("", lambda i: i % 3 != 0), ("some/instance" * 11, lambda i: True),
                               ("x", lambda i: i in (5, 39))):
            missing = [d for i, d in enumerate(digests) if pick(i)]
            request = _fmb(instance, digests, function.proto_value)
            encoded = encode_missing(re_pb2.FindMissingBlobsRequest.FromString(request.SerializeToString()),
                                     digests, missing)
            want = re_pb2.FindMissingBlobsResponse(
                missing_blob_digests=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in missing])
            assert encoded is not None
            assert encoded.wire == want.SerializeToString()
            assert encoded.missing_count == len(missing)


def test_a_findmissing_response_is_built_as_protobuf_where_it_cannot_be_cut() -> None:
    digests = [digest(b"%d" % i) for i in range(5)]
    # an unknown field inside a digest: not the canonical layout
    assert encode_missing(_fmb("", digests, unknown=b"\x18\x01"), digests, digests[1:]) is None
    # missing digests that are not the request's own objects (a backend built new ones)
    assert encode_missing(_fmb("", digests), digests, [Digest(*d) for d in digests[1:]]) is None
    # SHA-512: a hash length that takes two varint bytes
    long = [digest(b"%d" % i, DigestFunction.SHA512) for i in range(3)]
    assert encode_missing(_fmb("", long), long, long[:1]) is None
    assert encode_missing(_fmb("", digests), digests, []).wire == b""
