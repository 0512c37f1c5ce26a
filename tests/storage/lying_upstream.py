"""A real REAPI upstream that lies: for the tests of verification on read.

A small grpc.aio server (Capabilities, CAS FindMissingBlobs / BatchReadBlobs /
BatchUpdateBlobs, ByteStream Read) on 127.0.0.1, run in a thread of its own so
that a test may call it, or a casbah process in front of it, with blocking
clients.  It holds real blobs; for the digests in `lies` it answers every read
with bytes of the right length that are not the blob (each byte inverted), as a
compromised or broken upstream would.  Not a mock of casbah: a different server
that speaks the same protocol, which is what an edge is pointed at.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import grpc
from google.rpc import code_pb2

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.build.bazel.semver import semver_pb2
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

CHUNK = 1 << 20
_INVERT = bytes(255 - i for i in range(256))


class LyingUpstream:
    def __init__(self) -> None:
        self.blobs: dict[tuple[str, int], bytes] = {}
        self.lies: set[str] = set()
        #: Bytes sent by ByteStream.Read, in all.
        self.streamed = 0
        self.address = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None

    def add(self, digest: Digest, data: bytes, lie: bool = False) -> None:
        self.blobs[(digest.hash, digest.size)] = data
        if lie:
            self.lies.add(digest.hash)

    def served(self, hash_: str, size: int) -> bytes | None:
        data = self.blobs.get((hash_, size))
        if data is not None and hash_ in self.lies:
            return data.translate(_INVERT)  # same length, every byte wrong
        return data

    @property
    def url(self) -> str:
        return f"grpc://{self.address}"

    def start(self) -> LyingUpstream:
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="lying-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the lying upstream did not start")
        return self

    async def _start(self) -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(), server)
        re_grpc.add_ContentAddressableStorageServicer_to_server(_Cas(self), server)
        bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        if self._loop is None or self._server is None:
            return
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)

    def __enter__(self) -> LyingUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Capabilities(re_grpc.CapabilitiesServicer):
    async def GetCapabilities(self, request, context):
        return re_pb2.ServerCapabilities(
            cache_capabilities=re_pb2.CacheCapabilities(
                digest_functions=[re_pb2.DigestFunction.SHA256], max_batch_total_size_bytes=4 << 20),
            low_api_version=semver_pb2.SemVer(major=2), high_api_version=semver_pb2.SemVer(major=2))


class _Cas(re_grpc.ContentAddressableStorageServicer):
    def __init__(self, upstream: LyingUpstream) -> None:
        self.upstream = upstream

    async def FindMissingBlobs(self, request, context):
        return re_pb2.FindMissingBlobsResponse(missing_blob_digests=[
            d for d in request.blob_digests if (d.hash, d.size_bytes) not in self.upstream.blobs])

    async def BatchReadBlobs(self, request, context):
        response = re_pb2.BatchReadBlobsResponse()
        for d in request.digests:
            data = self.upstream.served(d.hash, d.size_bytes)
            entry = response.responses.add(digest=d)
            if data is None:
                entry.status.code = code_pb2.NOT_FOUND
            else:
                entry.data = data
        return response

    async def BatchUpdateBlobs(self, request, context):
        response = re_pb2.BatchUpdateBlobsResponse()
        for r in request.requests:
            self.upstream.blobs[(r.digest.hash, r.digest.size_bytes)] = r.data
            response.responses.add(digest=r.digest)
        return response


class _ByteStream(bs_grpc.ByteStreamServicer):
    def __init__(self, upstream: LyingUpstream) -> None:
        self.upstream = upstream

    async def Read(self, request, context) -> AsyncIterator[bs_pb2.ReadResponse]:
        parts = request.resource_name.split("/")
        i = parts.index("blobs")
        data = self.upstream.served(parts[i + 1], int(parts[i + 2]))
        if data is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{request.resource_name} not here")
        end = len(data) if not request.read_limit else request.read_offset + request.read_limit
        for pos in range(request.read_offset, end, CHUNK):
            piece = data[pos : min(pos + CHUNK, end)]
            self.upstream.streamed += len(piece)
            yield bs_pb2.ReadResponse(data=piece)
