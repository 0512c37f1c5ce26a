"""FindMissingBlobs requests parsed from their bytes (server/wire.py `FindMissingParser`)
never disagree with protobuf: where the fast parse accepts a request, its instance,
function, hashes and sizes are protobuf's, and its response is byte for byte the
protobuf serialization; where it cannot (other layouts, unknown fields, upper-case
hex, negative sizes, garbage), protobuf parses the request (or refuses it) as before.
A fuzz of mutated requests checks the first promise on inputs nobody wrote by hand.
The server path is covered over gRPC by test_cas.py and the storage contract suite."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from casbah.digest import Digest, DigestFunction
from casbah.digest_batch import DigestArray
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.server.wire import FindMissingParser, FindMissingRequest

parse = FindMissingParser()
SIZES = [1, 127, 128, 16383, 16384, (1 << 21) - 1, 1 << 21, 1 << 35, (1 << 63) - 1]
HASHERS = {32: hashlib.md5, 40: hashlib.sha1, 64: hashlib.sha256, 96: hashlib.sha384, 128: hashlib.sha512}


def request(count: int, width: int = 64, instance: str = "", function: int = 0, sizes=SIZES,
            rng: random.Random | None = None) -> re_pb2.FindMissingBlobsRequest:
    rng = rng or random.Random(count * width)
    digests = [re_pb2.Digest(hash=HASHERS[width](rng.randbytes(8)).hexdigest(), size_bytes=rng.choice(sizes))
               for _ in range(count)]
    return re_pb2.FindMissingBlobsRequest(instance_name=instance, blob_digests=digests, digest_function=function)


def agrees(raw: bytes, parsed: FindMissingRequest) -> None:
    """`parsed` says what protobuf says of `raw`."""
    message = re_pb2.FindMissingBlobsRequest.FromString(raw)
    assert parsed.instance_name == message.instance_name
    assert parsed.digest_function == message.digest_function
    assert parsed.count == len(message.blob_digests)
    width = len(message.blob_digests[0].hash)
    function = next(f for f in DigestFunction if f.hex_length == width)
    array = parsed.digests(function)
    if array is None:  # a size 0: left to the general path
        assert any(d.size_bytes == 0 for d in message.blob_digests)
        return
    assert list(array) == [Digest(d.hash, d.size_bytes, function) for d in message.blob_digests]
    prefix = np.frombuffer(b"".join(bytes.fromhex(d.hash[:32]) for d in message.blob_digests), dtype="<u8")
    assert np.array_equal(array.prefix.reshape(-1), prefix)


@pytest.mark.parametrize("width", sorted(f.hex_length for f in DigestFunction if f.hex_length < 128))
@pytest.mark.parametrize(("instance", "function"), [("", 0), ("main", 0), ("a/b" * 50, 1), ("", 6)])
def test_a_request_protobuf_wrote_is_parsed_from_its_bytes(width: int, instance: str, function: int) -> None:
    message = request(300, width, instance, function)
    raw = message.SerializeToString()
    parsed = parse(raw)
    assert isinstance(parsed, FindMissingRequest)
    agrees(raw, parsed)


def test_the_response_is_the_protobuf_serialization_of_the_missing_ones() -> None:
    message = request(500)
    parsed = parse(message.SerializeToString())
    assert isinstance(parsed, FindMissingRequest)
    array = parsed.digests(DigestFunction.SHA256)
    assert array is not None
    mask = np.array([random.Random(i).random() < 0.8 for i in range(500)])
    missing = array.select(mask)
    want = re_pb2.FindMissingBlobsResponse(
        missing_blob_digests=[d for d, m in zip(message.blob_digests, mask.tolist(), strict=True) if m])
    encoded = parsed.respond(missing)
    assert encoded.wire == want.SerializeToString()
    assert encoded.missing_count == int(mask.sum())
    assert parsed.respond(array.select(np.zeros(500, dtype=bool))).wire == b""


def test_other_layouts_go_to_protobuf() -> None:
    base = request(20)
    raw = base.SerializeToString()
    first = base.blob_digests[0]
    # digest_function before the digests (fields out of number order)
    reordered = b"\x18\x01" + raw
    # an unknown field inside a digest
    inner = first.SerializeToString() + b"\x18\x05"
    unknown = b"\x12" + bytes([len(inner)]) + inner + raw
    # upper-case hex, a negative size, sha512's two-byte hash length, and no digests at all
    upper = re_pb2.FindMissingBlobsRequest(blob_digests=[re_pb2.Digest(hash=first.hash.upper(), size_bytes=1)] * 20)
    negative = re_pb2.FindMissingBlobsRequest(blob_digests=[re_pb2.Digest(hash=first.hash, size_bytes=-1)] * 20)
    for raw_other in (reordered, unknown, upper.SerializeToString(), negative.SerializeToString(),
                      request(20, 128).SerializeToString(), re_pb2.FindMissingBlobsRequest(
                          instance_name="x").SerializeToString()):
        parsed = parse(raw_other)
        assert isinstance(parsed, re_pb2.FindMissingBlobsRequest)
        assert parsed == re_pb2.FindMissingBlobsRequest.FromString(raw_other)


def test_a_size_zero_is_left_to_the_general_path() -> None:
    parsed = parse(request(30, sizes=[0, 5]).SerializeToString())
    assert isinstance(parsed, FindMissingRequest)
    assert parsed.digests(DigestFunction.SHA256) is None
    assert parsed.digests(DigestFunction.SHA1) is None  # another width: the general path names the error


def test_mutated_requests_never_disagree_with_protobuf() -> None:
    """Random byte flips, insertions and cuts of valid requests: the fast parse either
    agrees with protobuf or hands the request to protobuf."""
    rng = random.Random(1234)
    fast = 0
    for trial in range(3000):
        raw = bytearray(request(rng.randint(1, 8), rng.choice([40, 64]), rng.choice(["", "i"]),
                                rng.choice([0, 1]), rng=rng).SerializeToString())
        for _ in range(rng.randint(0, 2)):
            at = rng.randrange(len(raw))
            action = rng.randrange(3)
            if action == 0:
                raw[at] = rng.choice([0x12, 0x0A, 0x10, 0x18, 0x40, 0x28, 0x80, 0x00, rng.randrange(256)])
            elif action == 1:
                raw.insert(at, rng.randrange(256))
            else:
                del raw[at:at + rng.randint(1, 3)]
        data = bytes(raw)
        try:
            expected = re_pb2.FindMissingBlobsRequest.FromString(data)
        except DecodeError:
            with pytest.raises(DecodeError):
                parse(data)
            continue
        parsed = parse(data)
        if isinstance(parsed, FindMissingRequest):
            fast += 1
            agrees(data, parsed)
        else:
            assert parsed == expected, trial
    assert fast > 1000  # most mutations leave a valid request


def test_a_digest_array_builds_digests_on_demand() -> None:
    digests = [Digest(hashlib.sha256(os.urandom(4)).hexdigest(), n + 1) for n in range(50)]
    array = DigestArray.of(digests, DigestFunction.SHA256)
    assert array[7] == digests[7]
    assert array[-1] == digests[-1]
    assert list(array) == digests
    assert array[3:5] == digests[3:5]
    odd = array.select(np.arange(50) % 2 == 1)
    assert list(odd) == digests[1::2]
    assert odd.positions.tolist() == list(range(1, 50, 2))
