"""One status table: an exception gets the same gRPC status as a whole call's status
(`rpc`/`rpc_stream` in `casbah.server.base`) and as a per-blob status (`error_status`
in `casbah.server.cas`), and wire numbers convert through one lookup.

No casbah backend lets a bare `TimeoutError` escape to a servicer on purpose, so the
fault cannot be caused through `casbah serve`: these tests raise it from a stand-in
servicer wrapped by the real `rpc`/`rpc_stream`, served by a real grpc.aio server on
loopback and called by a real client, so what is checked is the status on the wire.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casbah.errors import NotFound, code_from_int, code_to_int, status_code
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc
from casbah.server.base import rpc, rpc_stream
from casbah.server.cas import error_status


class _Failing(re_grpc.CapabilitiesServicer, bs_grpc.ByteStreamServicer):
    """Raises the exception under test from a unary and from a streaming handler."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @rpc
    async def GetCapabilities(self, request, context):
        raise self.exc

    @rpc_stream
    async def Read(self, request, context):
        yield bs_pb2.ReadResponse(data=b"first")
        raise self.exc


async def _statuses(exc: BaseException) -> tuple[grpc.StatusCode, str, grpc.StatusCode, str]:
    server = grpc.aio.server()
    servicer = _Failing(exc)
    re_grpc.add_CapabilitiesServicer_to_server(servicer, server)
    bs_grpc.add_ByteStreamServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await re_grpc.CapabilitiesStub(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest())
            call = bs_grpc.ByteStreamStub(channel).Read(bs_pb2.ReadRequest(resource_name="x"))
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                async for _ in call:
                    pass
    finally:
        await server.stop(None)
    return unary.value.code(), unary.value.details(), stream.value.code(), stream.value.details()


@pytest.mark.parametrize(("exc", "expected"), [
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED),
    (TimeoutError("upstream did not answer"), grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotFound("no such thing"), grpc.StatusCode.NOT_FOUND),
    (ValueError("a bug"), grpc.StatusCode.INTERNAL),
])
def test_call_status_and_per_blob_status_agree(exc: BaseException, expected: grpc.StatusCode) -> None:
    unary, unary_details, stream, stream_details = asyncio.run(_statuses(exc))
    assert unary == stream == expected
    assert error_status(exc).code == code_to_int(expected)  # what BatchUpdateBlobs would say for one blob
    assert type(exc).__name__ in unary_details or str(exc) in unary_details
    assert "GetCapabilities" in unary_details or str(exc) == unary_details
    assert stream_details.endswith(str(exc))


def test_wire_numbers_round_trip() -> None:
    for code in grpc.StatusCode:
        assert code_from_int(code_to_int(code)) is code
    assert code_from_int(17) is grpc.StatusCode.UNKNOWN  # not a gRPC code
    assert code_from_int(-1) is grpc.StatusCode.UNKNOWN
    assert status_code(TimeoutError()) is grpc.StatusCode.DEADLINE_EXCEEDED
