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
from typing import Any

import grpc
from google.rpc import status_pb2

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.reapi.wire import varint

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

    __slots__ = ("payload_bytes", "wire")

    def __init__(self, wire: bytes, payload_bytes: int) -> None:
        self.wire = wire
        self.payload_bytes = payload_bytes



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


def _register(add: Any, servicer: Any, server: Any, pre_encoded: str) -> None:
    """Run the generated `add_..._to_server` against a stand-in, let the method
    `pre_encoded` answer `Encoded` responses too, and register the handlers."""
    collected = _Collected()
    add(servicer, collected)
    handlers = dict(collected.handlers)
    generated = handlers[pre_encoded]
    make = grpc.unary_stream_rpc_method_handler if generated.response_streaming else grpc.unary_unary_rpc_method_handler
    handlers[pre_encoded] = make(getattr(servicer, pre_encoded), request_deserializer=generated.request_deserializer,
                                 response_serializer=_serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(collected.service, handlers),))
    server.add_registered_method_handlers(collected.service, handlers)


def add_cas_servicer(servicer: Any, server: Any) -> None:
    """`add_ContentAddressableStorageServicer_to_server`, BatchReadBlobs pre-encoded."""
    _register(re_grpc.add_ContentAddressableStorageServicer_to_server, servicer, server, "BatchReadBlobs")


def add_bytestream_servicer(servicer: Any, server: Any) -> None:
    """`add_ByteStreamServicer_to_server`, Read pre-encoded."""
    _register(bs_grpc.add_ByteStreamServicer_to_server, servicer, server, "Read")
