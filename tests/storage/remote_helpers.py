"""Helpers for the tests of the `remote` backend and the composing kinds.

- `casbah_in_process`: a real casbah (its Capabilities, CAS, ByteStream and
  ActionCache servicers over memory storage) on a grpc.aio server in the test's
  event loop, optionally behind TLS and with server interceptors.  The
  interceptors (`Faults`) inject what a real casbah never does on demand: fail the
  first calls with UNAVAILABLE, hang, drop a ByteStream.Read mid-way; and they
  record what arrived (methods, metadata, read offsets).
- `make_certs`: a throwaway CA, a server certificate for 127.0.0.1/localhost and
  client certificates, made with the openssl command line.
- `build_node`: a storage node built by the loader, as the server builds it.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from casbah.config import ServerConfig
from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.server.action_cache import ActionCacheService
from casbah.server.app import build_instances, create_server
from casbah.server.bytestream import ByteStreamService
from casbah.server.capabilities import CapabilitiesService
from casbah.server.cas import CasService
from casbah.server.wire import add_bytestream_servicer, add_cas_servicer
from casbah.storage.base import Storage
from casbah.storage.loader import StorageLoader, load_builtin_kinds

MiB = 1 << 20
HAVE_OPENSSL = shutil.which("openssl") is not None


def blob(size: int) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data), data


async def pieces(data: bytes, piece: int = 64 * 1024) -> AsyncIterator[bytes]:
    for pos in range(0, len(data), piece):
        yield data[pos : pos + piece]


async def read_all(storage: Storage, digest: Digest, offset: int = 0, limit: int = 0) -> bytes:
    return b"".join([chunk async for chunk in await storage.read(digest, offset, limit)])


def build_node(node: dict[str, Any], named: dict[str, dict[str, Any]] | None = None) -> Storage:
    load_builtin_kinds()
    return StorageLoader(named or {}).build(node, "test")


def memory_config(**overrides: Any) -> ServerConfig:
    raw: dict[str, Any] = {
        "listen": [],
        "storages": {"default": {"kind": "memory", "max-size": "2G"},
                     "action-cache": {"kind": "memory", "verify": False}},
        "instances": {"": {"asset-index": "memory"}},
        **overrides,
    }
    return ServerConfig.model_validate(raw).with_defaults()


# --------------------------------------------------------------------------- faults


Wrap = Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]


@dataclass
class Faults(grpc.aio.ServerInterceptor):
    """Records every call (method name and metadata) and applies `rules[method]`,
    a function from the real handler to a faulty one."""

    rules: dict[str, Wrap] = field(default_factory=dict)
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def count(self, method: str) -> int:
        return sum(1 for name, _ in self.calls if name == method)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metadata = {k: v for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        self.calls.append((method, metadata))
        rule = self.rules.get(method)
        return rule(handler) if rule is not None and handler is not None else handler


def fail_first(n: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> Wrap:
    """A unary handler whose first `n` calls fail with `code` before doing anything."""
    seen = [0]

    def wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        async def call(request, context):
            seen[0] += 1
            if seen[0] <= n:
                await context.abort(code, f"injected failure {seen[0]}/{n}")
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(call, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    return wrap


def hang() -> Wrap:
    """A handler that never answers (an upstream stuck on a lock, a black-holed proxy)."""

    def wrap(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            async def unary(request, context):
                await asyncio.sleep(3600)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.stream_unary is not None:
            async def stream_unary(request_iterator, context):
                await asyncio.sleep(3600)  # and never reads the upload

            return grpc.stream_unary_rpc_method_handler(stream_unary, **kwargs)

        async def unary_stream(request, context):
            await asyncio.sleep(3600)
            yield  # pragma: no cover

        return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)

    return wrap


def as_message(response: Any, cls: Any) -> Any:
    """The protobuf message of a response: casbah's servicers hand gRPC the blob-carrying
    responses already encoded (`casbah.server.wire.Encoded`), which fault wrappers that
    look into them decode first."""
    return cls.FromString(response.wire) if hasattr(response, "wire") else response


def read_response(response: Any) -> bs_pb2.ReadResponse:
    return as_message(response, bs_pb2.ReadResponse)


def batch_read_response(response: Any) -> re_pb2.BatchReadBlobsResponse:
    return as_message(response, re_pb2.BatchReadBlobsResponse)


@dataclass
class DropRead:
    """ByteStream.Read that, on its first call only, stops after `after` bytes: with
    UNAVAILABLE (`how="abort"`, a connection reset) or by ending the stream early
    with OK (`how="end"`, a truncating proxy).  Records each request's read_offset."""

    after: int
    how: str = "abort"
    offsets: list[int] = field(default_factory=list)

    def __call__(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if inspect.iscoroutinefunction(handler.unary_stream):  # casbah writes with context.write()
            return self._around_writes(handler)

        async def read(request, context):
            self.offsets.append(request.read_offset)
            first = len(self.offsets) == 1
            sent = 0
            async for response in handler.unary_stream(request, context):
                response = read_response(response)
                if first and sent + len(response.data) >= self.after:
                    cut = response.__class__(data=response.data[: self.after - sent])
                    yield cut
                    if self.how == "abort":
                        await context.abort(grpc.StatusCode.UNAVAILABLE, "injected connection loss")
                    return
                sent += len(response.data)
                yield response

        return grpc.unary_stream_rpc_method_handler(read, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)

    def _around_writes(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same cut for a handler that writes with `context.write`: its writes pass through
        a stand-in context, and the cut stops the handler with an exception no servicer catches."""
        drop = self

        class Cut(BaseException):
            pass

        class Writes:
            def __init__(self, context) -> None:
                self.context, self.sent = context, 0

            def __getattr__(self, name: str):
                return getattr(self.context, name)

            async def write(self, response) -> None:
                response = read_response(response)
                if self.sent + len(response.data) >= drop.after:
                    await self.context.write(response.__class__(data=response.data[: drop.after - self.sent]))
                    raise Cut
                self.sent += len(response.data)
                await self.context.write(response)

        async def read(request, context) -> None:
            self.offsets.append(request.read_offset)
            if len(self.offsets) > 1:
                return await handler.unary_stream(request, context)
            try:
                await handler.unary_stream(request, Writes(context))
            except Cut:
                if self.how == "abort":
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected connection loss")

        return grpc.unary_stream_rpc_method_handler(read, request_deserializer=handler.request_deserializer,
                                                    response_serializer=handler.response_serializer)


# --------------------------------------------------------------------------- servers


@dataclass
class TLS:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: client certificates are required and checked against it


@asynccontextmanager
async def casbah_in_process(faults: Faults | None = None, tls: TLS | None = None,
                            config: ServerConfig | None = None) -> AsyncIterator[str]:
    """A real casbah in this event loop on 127.0.0.1:<free port>; yields the address.

    Without interceptors it is exactly what `casbah serve` runs (`create_server`);
    with them, the same servicers on a server that has the interceptors (grpc takes
    them only at construction).
    """
    config = config or memory_config()
    if faults is None:
        server = await create_server(config)
        grpc_server = server.grpc_server
        closers = server.closers
    else:
        instances, loader = build_instances(config)
        grpc_server = grpc.aio.server(interceptors=[faults], options=[
            ("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB),
            ("grpc.so_reuseport", 0)])
        bytestream = ByteStreamService(instances)
        re_grpc.add_CapabilitiesServicer_to_server(CapabilitiesService(instances), grpc_server)
        add_cas_servicer(CasService(instances), grpc_server)  # as `create_server`: pre-encoded responses
        re_grpc.add_ActionCacheServicer_to_server(ActionCacheService(instances), grpc_server)
        add_bytestream_servicer(bytestream, grpc_server)
        closers = [bytestream.close, *(s.close for s in loader.all())]
    if tls is None:
        port = grpc_server.add_insecure_port("127.0.0.1:0")
    else:
        credentials = grpc.ssl_server_credentials(
            [(tls.private_key, tls.cert_chain)], root_certificates=tls.client_ca,
            require_client_auth=tls.client_ca is not None,
        )
        port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    await grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(0)
        for close in closers:
            await close()


# --------------------------------------------------------------------------- certificates


@dataclass
class Certs:
    ca: Path
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path
    #: A client certificate from another CA: a TLS server that checks clients must refuse it.
    rogue_key: Path
    rogue_cert: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(directory: Path, name: str, ca: str, subject: str, ext: str) -> None:
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
    (directory / f"{name}.ext").write_text(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=directory)


def make_certs(directory: Path) -> Certs:
    directory.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                 "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=casbah test {ca}",
                 cwd=directory)
    _signed(directory, "server", "ca", "/CN=localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    _signed(directory, "client", "ca", "/CN=edge", "extendedKeyUsage=clientAuth\n")
    _signed(directory, "rogue", "rogue-ca", "/CN=rogue", "extendedKeyUsage=clientAuth\n")
    d = directory
    return Certs(d / "ca.pem", d / "server.key", d / "server.pem", d / "client.key", d / "client.pem",
                 d / "rogue.key", d / "rogue.pem")


# --------------------------------------------------------------------------- counting


class Counting(Storage):
    """A decorator that counts what reaches the store under it (calls per operation and
    the digests each find_missing asked about): not a mock, the store still works."""

    kind = "counting"

    def __init__(self, inner: Storage) -> None:
        super().__init__(name=f"counting({inner.name})", verify=inner.verify)
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.asked: list[list[Digest]] = []

    def _count(self, op: str) -> None:
        self.calls[op] = self.calls.get(op, 0) + 1

    async def find_missing(self, digests):
        self._count("find_missing")
        self.asked.append(list(digests))
        return await self.inner.find_missing(digests)

    async def read(self, digest, offset=0, limit=0):
        self._count("read")
        return await self.inner.read(digest, offset, limit)

    async def read_many(self, digests):
        self._count("read_many")
        return await self.inner.read_many(digests)

    async def read_bytes(self, digest):
        self._count("read_bytes")
        return await self.inner.read_bytes(digest)

    async def write(self, digest, chunks):
        self._count("write")
        await self.inner.write(digest, chunks)

    async def write_many(self, blobs):
        self._count("write_many")
        return await self.inner.write_many(blobs)

    async def delete(self, digests):
        self._count("delete")
        return await self.inner.delete(digests)

    def iterate(self):
        return self.inner.iterate()
