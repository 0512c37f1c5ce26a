"""Whole-call errors go through the one status table (`casbah.errors.status_code`), as
per-blob statuses do: a `TimeoutError` escaping a handler is DEADLINE_EXCEEDED, not INTERNAL.

A real grpc.aio server on loopback runs handlers wrapped by `casbah.server.base.rpc`; the
handlers raise the error directly because a backend timing out on cue cannot be arranged
for real (this is the one injected fault).
"""

from __future__ import annotations

import asyncio

import grpc
import pytest

from casbah.errors import Unavailable
from casbah.server.base import rpc


class Handlers:
    @rpc
    async def timeout(self, request: bytes, context) -> bytes:
        raise TimeoutError

    @rpc
    async def unavailable(self, request: bytes, context) -> bytes:
        raise Unavailable("redis://db: connection refused")

    @rpc
    async def bug(self, request: bytes, context) -> bytes:
        raise KeyError("oops")


async def call_each() -> dict[str, tuple[grpc.StatusCode, str]]:
    handlers = Handlers()
    methods = {name: grpc.unary_unary_rpc_method_handler(getattr(handlers, name))
               for name in ("timeout", "unavailable", "bug")}
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.Status", methods)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    results = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in methods:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/test.Status/{name}")(b"")
                results[name] = (info.value.code(), info.value.details())
    finally:
        await server.stop(0)
    return results


def test_whole_call_errors_use_the_one_table() -> None:
    results = asyncio.run(call_each())
    assert results["timeout"][0] == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "TimeoutError" in results["timeout"][1]
    assert results["unavailable"] == (grpc.StatusCode.UNAVAILABLE, "redis://db: connection refused")
    assert results["bug"][0] == grpc.StatusCode.INTERNAL
    assert "internal error: KeyError" in results["bug"][1]
