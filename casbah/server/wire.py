"""The responses that carry blob bytes (BatchReadBlobsResponse, ByteStream's
ReadResponse) in protobuf wire form, and the services registered so that gRPC sends
those bytes as they are.

Building a response as protobuf objects costs a Python-to-upb call per field and
copies every blob twice (into the message, then into the serialized bytes): measured
as the largest part of the server's CPU in BatchReadBlobs of small blobs.  Here each
blob is copied once, by the join.  The encoding is the canonical one (fields in number
order, defaults omitted), so a client decodes exactly what protobuf would have sent:
responses = 1 (Response: digest = 1 {hash = 1, size_bytes = 2}, data = 2,
status = 3 {code = 1, message = 2}, compressor = 4); ReadResponse: data = 10.
tests/server/test_wire.py compares them with protobuf's own serialization.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from operator import itemgetter
from typing import Any

import grpc
import numpy as np
from google.rpc import status_pb2
from numpy.lib.stride_tricks import sliding_window_view

from casbah.digest import INFERABLE_LENGTHS, Digest, DigestFunction
from casbah.digest_batch import DigestArray
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.reapi.wire import read_varint, varint

#: Varints of the small values (lengths of hashes and short fields), looked up, not built.
_SMALL = [bytes([n]) for n in range(0x80)]
#: Varints of every value below 32 Ki, looked up: a batch of inline blobs (at most 16 KiB
#: each) needs three a blob, and building them cost half of the encoding's time
#: (1.0 -> 0.5 µs a blob of 1-8 KiB, measured).  ~1.4 MB, once per process.
_VARINTS = _SMALL + [varint(n) for n in range(0x80, 1 << 15)]
_TABLED = 1 << 15
_NOT_FOUND = status_pb2.Status(code=5).SerializeToString()  # google.rpc.Code.NOT_FOUND
_ZSTD_FIELD = b"\x20\x01"  # compressor = Compressor.ZSTD (1)


def _len(n: int) -> bytes:
    """A varint, without a loop for the lengths a batch of small blobs has (< 2 MiB)."""
    if n < 0x80:
        return _SMALL[n]
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, (n >> 7) & 0x7F | 0x80, n >> 14))
    return varint(n)


class Encoded:
    """A serialized response message and the blob bytes it carries (for metrics)."""

    __slots__ = ("missing_count", "payload_bytes", "wire")

    def __init__(self, wire: bytes, payload_bytes: int, missing_count: int = 0) -> None:
        self.wire = wire
        self.payload_bytes = payload_bytes
        self.missing_count = missing_count  # FindMissingBlobs: digests reported missing


def encode_missing(request: Any, digests: Sequence[Digest], missing: Sequence[Digest]) -> Encoded | None:
    """A FindMissingBlobsResponse cut out of the request's own bytes, or None where it
    cannot be (then the caller builds it as protobuf objects).

    `missing_blob_digests` is field 2 of the response as `blob_digests` is of the
    request, and protobuf's serialization of a Digest is canonical, so the response is
    the request's digest fields of the missing ones, in order: numpy selects their bytes
    (no Python call per digest; measured: building 800 Digest messages was ~10 % of the
    server's CPU in FindMissingBlobs).  `digests` are the request's, in order; `missing`
    must be those very objects (the storage stack passes them through), else None.
    """
    n = len(digests)
    if not missing or n == 0:
        return Encoded(b"", 0, 0)
    chosen = np.sort(np.fromiter(map(id, missing), dtype=np.int64, count=len(missing)))
    ids = np.fromiter(map(id, digests), dtype=np.int64, count=n)
    at = np.searchsorted(chosen, ids)
    at[at == len(chosen)] = 0
    flags = chosen[at] == ids
    if int(flags.sum()) != len(missing) or (chosen[1:] == chosen[:-1]).any():
        return None
    raw = request.SerializeToString()
    start = 0
    if raw[:1] == b"\x0a":  # instance_name
        length, start = read_varint(raw, 1)
        start += length
    hex_len = len(digests[0].hash)
    sizes = np.fromiter(map(_SIZE, digests), dtype=np.uint64, count=n)
    size_len = np.where(sizes == 0, 0, 2 + np.searchsorted(_VARINT_LIMITS, sizes))  # tag + varint
    inner = 2 + hex_len + size_len  # hash tag and length byte, hash, size tag and varint
    if hex_len > 125 or any(len(d.hash) != hex_len for d in missing):
        return None  # a length that takes two varint bytes: not worth a fast path
    lengths = 2 + inner
    ends = np.cumsum(lengths) + start
    if int(ends[-1]) > len(raw):
        return None
    arr = np.frombuffer(raw, dtype=np.uint8)
    offsets = ends - lengths
    if not ((arr[offsets] == 0x12).all() and (arr[offsets + 1] == inner).all()):
        return None  # not the canonical layout (unknown fields inside a digest)
    body = arr[start:int(ends[-1])][np.repeat(flags, lengths)].tobytes()
    return Encoded(body, 0, len(missing))


#: Sizes from which a varint takes one more byte (2^7, 2^14, ...).
_VARINT_LIMITS = np.array([1 << (7 * k) for k in range(1, 10)], dtype=np.uint64) - np.uint64(1)
_SIZE = itemgetter(1)



class FindMissingRequest:
    """A FindMissingBlobsRequest kept as its bytes, its digests found by numpy.

    The layout protobuf writes (fields in number order, each digest `0x12 len 0x0a
    width HASH [0x10 SIZE]`) is parsed without a Python object per digest: every
    position where a digest's header could start is found at once, and the parse is
    accepted only if those positions chain exactly, each record ending where the next
    begins, from the first digest to the end of the field.  A hex character or a
    varint continuation byte can never look like a header, so a request protobuf wrote
    always chains; one that does not (unknown fields, another layout) is parsed by
    protobuf instead (`FindMissingParser`).  The hashes are validated here as
    `make_digest` would; what needs the function (the width) and the empty blob (size
    0) is checked by `digests`, which sends the rest to the general path.
    """

    __slots__ = ("_arr", "_hexes", "_lengths", "_prefix", "_sizes", "count", "digest_function", "first_hash",
                 "instance_name", "raw")

    def __init__(self, raw: bytes, instance_name: str, digest_function: int, arr: np.ndarray,
                 lengths: np.ndarray, hexes: np.ndarray, sizes: np.ndarray, prefix: np.ndarray) -> None:
        self.raw = raw
        self.instance_name = instance_name
        self.digest_function = digest_function
        self._arr = arr  # the digests field's bytes
        self._lengths = lengths
        self._hexes = hexes
        self._sizes = sizes
        self._prefix = prefix
        self.count = len(sizes)
        first = hexes[0].tobytes().decode()
        #: What an unset digest_function is inferred from (as `_first_hash` in server/cas.py).
        self.first_hash = first if len(first) in INFERABLE_LENGTHS else None

    def digests(self, function: DigestFunction) -> DigestArray | None:
        """The digests as `function`'s, or None where the general path must decide (a
        hash of another width is an error it names; a size 0 may be the empty blob)."""
        if self._hexes.shape[1] != function.hex_length or not self._sizes.all():
            return None
        return DigestArray(function, self._hexes, self._sizes, self._prefix, np.arange(self.count))

    def respond(self, missing: DigestArray) -> Encoded:
        """The response: the request's records of the `missing` ones, in order."""
        if not len(missing):
            return Encoded(b"", 0, 0)
        flags = np.zeros(self.count, dtype=bool)
        flags[missing.positions] = True
        return Encoded(self._arr[np.repeat(flags, self._lengths)].tobytes(), 0, len(missing))

    def parsed(self) -> Any:
        return re_pb2.FindMissingBlobsRequest.FromString(self.raw)

    def SerializeToString(self) -> bytes:  # the protobuf method `encode_missing` calls
        return self.raw


class FindMissingParser:
    """The FindMissingBlobs request deserializer: a `FindMissingRequest` where the fast
    parse applies, else protobuf's message.  `message_type` tells the interceptor what
    the request is (server/interceptor.py)."""

    message_type = re_pb2.FindMissingBlobsRequest

    def __call__(self, raw: bytes) -> Any:
        try:
            request = _parse_find_missing(raw)
        except (IndexError, UnicodeDecodeError, ValueError):
            request = None
        return request if request is not None else re_pb2.FindMissingBlobsRequest.FromString(raw)


_HEX_DIGITS = b"0123456789abcdef"


def _parse_find_missing(raw: bytes) -> FindMissingRequest | None:
    pos, instance, end, function = 0, "", len(raw), 0
    if raw[:1] == b"\x0a":  # instance_name = 1
        length, pos = read_varint(raw, 1)
        instance = raw[pos:pos + length].decode()
        pos += length
    if end - pos >= 2 and raw[-2] == 0x18 and raw[-1] < 0x80:  # digest_function = 3, last
        function, end = raw[-1], end - 2
    if end - pos < 36 or raw[pos] != 0x12 or raw[pos + 2] != 0x0A:
        return None
    width = raw[pos + 3]
    if width < 32 or width >= 0x80 or width % 2:
        return None
    arr = np.frombuffer(raw, dtype=np.uint8, count=end - pos, offset=pos)
    starts = np.flatnonzero(arr[:-3] == 0x12)
    starts = starts[(arr[starts + 2] == 0x0A) & (arr[starts + 3] == width)]
    lengths = arr[starts + 1].astype(np.int64) + 2
    ends = starts + lengths
    if starts[0] != 0 or ends[-1] != len(arr) or not np.array_equal(ends[:-1], starts[1:]):
        return None  # not one chain of digests: another layout, or unknown fields
    if (lengths < width + 4).any():
        return None  # a record shorter than its hash
    hexes = sliding_window_view(arr, width)[starts + 4]  # a row copy per digest
    if hexes.tobytes().translate(None, _HEX_DIGITS):
        return None  # not lowercase hex: the general path names the digest
    prefix = np.frombuffer(bytes.fromhex(hexes[:, :32].tobytes().decode()), dtype="<u8").reshape(-1, 2)
    sizes = _sizes(arr, starts, lengths - (width + 4), width)
    return None if sizes is None else FindMissingRequest(
        raw, instance, function, arr, lengths, hexes, sizes, prefix)


def _sizes(arr: np.ndarray, starts: np.ndarray, rest: np.ndarray, width: int) -> np.ndarray | None:
    """Each record's size_bytes from the `rest` bytes after its hash (none, or the tag
    0x10 and a varint of at most 9 bytes), or None if any is not that.  All varints
    are decoded at once, as rows of a window over the bytes."""
    vlen = rest - 1  # -1: no size field
    has = rest > 0
    if ((vlen == 0) | (vlen > 9)).any():
        return None
    longest = int(vlen.max())
    if longest <= 0:
        return np.zeros(len(starts), dtype=np.uint64)
    at = starts + 4 + width
    if (arr[at[has]] != 0x10).any():
        return None
    padded = np.concatenate((arr, np.zeros(longest, dtype=np.uint8)))
    rows = sliding_window_view(padded, longest)[at + 1]
    k = np.arange(longest)
    inside = k < vlen[:, None]
    if (inside & ((rows >= 0x80) != (k < (vlen - 1)[:, None]))).any():
        return None  # a continuation bit where a varint ends, or none before
    values = (rows & np.uint8(0x7F)).astype(np.uint64) << (7 * k).astype(np.uint64)
    return np.where(inside, values, np.uint64(0)).sum(axis=1, dtype=np.uint64)


def encode_batch_read(digests: Sequence[Digest], found: Mapping[Digest, bytes],
                      statuses: Mapping[Digest, status_pb2.Status],
                      packed: Mapping[Digest, bytes] | None = None) -> Encoded:
    """One Response per digest, in request order: the blob for those in `found` (its
    zstd form instead when in `packed`), else the status in `statuses`, else NOT_FOUND."""
    parts: list[bytes] = []
    append = parts.append
    payload = 0
    table = _VARINTS
    for digest in digests:
        hash_bytes = digest.hash.encode()
        size = digest.size
        # Concatenation of short bytes and tabled varints, not %-formatting: ~2x faster a blob.
        body = b"\x0a" + table[len(hash_bytes)] + hash_bytes
        if size:
            body += b"\x10" + (table[size] if size < _TABLED else varint(size))
        data = found.get(digest)
        if data is None:
            status = statuses.get(digest)
            encoded = _NOT_FOUND if status is None else status.SerializeToString()
            head = b"\x0a%b%b\x1a%b%b" % (_len(len(body)), body, _len(len(encoded)), encoded)
            append(b"\x0a%b%b" % (_len(len(head)), head))
            continue
        tail = b""
        if packed and (smaller := packed.get(digest)) is not None:
            data, tail = smaller, _ZSTD_FIELD
        n = len(data)
        if not n:  # the empty blob: no data field
            head = b"\x0a%b%b%b" % (_len(len(body)), body, tail)
            append(b"\x0a%b%b" % (_len(len(head)), head))
            continue
        head = b"\x0a" + table[len(body)] + body + b"\x12" + (table[n] if n < _TABLED else varint(n))
        whole = len(head) + n + len(tail)
        append(b"\x0a" + (table[whole] if whole < _TABLED else varint(whole)) + head)
        append(data)
        payload += n
        if tail:
            append(tail)
    return Encoded(b"".join(parts), payload)


def encode_read(data: bytes | memoryview) -> Encoded:
    """A ByteStream ReadResponse (data = 10) of `data`, which may be a view of a larger
    chunk: the concatenation is its one copy."""
    n = len(data)
    return Encoded(b"\x52" + varint(n) + data if n else b"", n)


def _serialize(response: Any) -> bytes:
    if isinstance(response, Encoded):
        return response.wire
    return response.SerializeToString()


class _Collected:
    """Stands in for the server while the generated code lists the service's handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, _handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def _register(add: Any, servicer: Any, server: Any, *pre_encoded: str,
              deserializers: dict[str, Any] | None = None) -> None:
    """Run the generated `add_..._to_server` against a stand-in, let the methods
    `pre_encoded` answer `Encoded` responses too (and read their requests with
    `deserializers`, where given), and register the handlers."""
    collected = _Collected()
    add(servicer, collected)
    handlers = dict(collected.handlers)
    for name in pre_encoded:
        generated = handlers[name]
        make = (grpc.unary_stream_rpc_method_handler if generated.response_streaming
                else grpc.unary_unary_rpc_method_handler)
        deserializer = (deserializers or {}).get(name, generated.request_deserializer)
        handlers[name] = make(getattr(servicer, name), request_deserializer=deserializer,
                              response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)


def add_cas_servicer(servicer: Any, server: Any) -> None:
    """`add_ContentAddressableStorageServicer_to_server`, BatchReadBlobs and FindMissingBlobs pre-encoded."""
    _register(re_grpc.add_ContentAddressableStorageServicer_to_server, servicer, server,
              "BatchReadBlobs", "FindMissingBlobs", deserializers={"FindMissingBlobs": FindMissingParser()})


def add_bytestream_servicer(servicer: Any, server: Any) -> None:
    """`add_ByteStreamServicer_to_server`, Read pre-encoded."""
    _register(bs_grpc.add_ByteStreamServicer_to_server, servicer, server, "Read")
