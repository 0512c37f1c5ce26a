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

from casbah.digest import Digest
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


def _register(add: Any, servicer: Any, server: Any, *pre_encoded: str) -> None:
    """Run the generated `add_..._to_server` against a stand-in, let the methods
    `pre_encoded` answer `Encoded` responses too, and register the handlers."""
    collected = _Collected()
    add(servicer, collected)
    handlers = dict(collected.handlers)
    for name in pre_encoded:
        generated = handlers[name]
        make = (grpc.unary_stream_rpc_method_handler if generated.response_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[name] = make(getattr(servicer, name), request_deserializer=generated.request_deserializer,
                              response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)


def add_cas_servicer(servicer: Any, server: Any) -> None:
    """`add_ContentAddressableStorageServicer_to_server`, BatchReadBlobs and FindMissingBlobs pre-encoded."""
    _register(re_grpc.add_ContentAddressableStorageServicer_to_server, servicer, server,
              "BatchReadBlobs", "FindMissingBlobs")


def add_bytestream_servicer(servicer: Any, server: Any) -> None:
    """`add_ByteStreamServicer_to_server`, Read pre-encoded."""
    _register(bs_grpc.add_ByteStreamServicer_to_server, servicer, server, "Read")
