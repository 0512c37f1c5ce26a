"""A server's operational endpoints: gRPC health and reflection, and the HTTP side
(`/metrics`, `/healthz`, the status page; `casbah.server.http_site`) served by aiohttp in
the server's own event loop.  aiohttp and prometheus_client are imported only when that
side starts (`--metrics-listen`): they are a fifth of a default server's startup.

Health lets load balancers and Kubernetes probes ask over gRPC instead of guessing
from an open port; reflection lets grpcurl and grpc_cli call the server without
the .proto files at hand.  On shutdown both health and `/healthz` turn
NOT_SERVING before the drain starts, so balancers stop sending work.

HTTP routes (the status page adds its own, see `casbah.server.status_page`):
  /metrics        Prometheus text format (storage gauges refreshed per scrape)
  /healthz        200 "ok" while serving, 503 while shutting down
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import grpc

from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.casbah.admin.v1 import admin_pb2
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.server.auth import Authorizer
from casbah.server.observability import Observability

if TYPE_CHECKING:
    from aiohttp import web

#: Every gRPC service casbah registers (health and reflection list these).
SERVED_SERVICES = (
    re_pb2.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    re_pb2.DESCRIPTOR.services_by_name["ActionCache"].full_name,
    bs_pb2.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Fetch"].full_name,
    ra_pb2.DESCRIPTOR.services_by_name["Push"].full_name,
    bst_pb2.DESCRIPTOR.services_by_name["ReferenceStorage"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
)


class Endpoints:
    """Health, reflection and the HTTP runner of one server, and their shutdown."""

    def __init__(self, obs: Observability, authorizer: Authorizer | None = None) -> None:
        self.obs = obs
        #: The gRPC side's access control, applied to the HTTP side too (`http_auth`).
        self.authorizer = authorizer
        self.health: Any = None
        self.http: web.AppRunner | None = None

    async def add_health_and_reflection(self, server: grpc.aio.Server,
                                        services: Iterable[str] = SERVED_SERVICES) -> None:
        """Register grpc.health.v1 (SERVING for "" and each service) and server reflection."""
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = [*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name]
        for name in ("", *names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)

    async def enter_shutdown(self) -> None:
        """Health turns NOT_SERVING (and /healthz 503) before the drain starts."""
        self.obs.shutting_down = True
        if self.health is not None:
            await self.health.enter_graceful_shutdown()

    async def start_http(self, address: str, worker: int | None = None) -> str:
        """Serve /metrics, /healthz and the status page; returns the URL (port 0 resolved)."""
        from casbah.server.http_site import start_http_server

        self.http, url = await start_http_server(self.obs, address, worker, self.authorizer)
        return url

    async def close(self) -> None:
        if self.http is not None:
            runner, self.http = self.http, None
            await runner.cleanup()
