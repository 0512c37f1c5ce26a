"""The HTTP front: an aiohttp server on the gRPC server's event loop, on the same instances.

Paths name the instance by prefix, as Bazel's and ccache's URL prefixes do:

- `/<instance…>/cas/<sha256>` and `/<instance…>/ac/<sha256>`: Bazel's HTTP cache
  protocol (`bazel.py`); the instance is everything before `cas`/`ac` (several
  segments allowed, none: the instance `""`).
- anything else: an opaque entry (`webdav.py`); the longest leading run of segments
  that names a served instance selects it (none: `""`), the rest is the key.

Errors are `casbah.errors` exceptions mapped through the one gRPC status table and
then to HTTP (`_HTTP_STATUS`); every answer is counted in
`casbah_http_requests_total{method,route,code}`.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import Counter

from casbah.config import ServerConfig
from casbah.errors import CasbahError, status_code
from casbah.http import bazel, webdav
from casbah.http.common import HttpState, Target, check_hash
from casbah.http.kv import OpaqueStore
from casbah.server.base import Instance, Instances
from casbah.storage.loader import StorageLoader

log = logging.getLogger("casbah.http")

REQUESTS = Counter("casbah_http_requests", "Requests served by the HTTP front", ["method", "route", "code"])

#: The HTTP answer for each gRPC status (the exceptions map to those through errors.py).
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.OUT_OF_RANGE: 416,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 503,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
}

_BAZEL_ROUTES = {"cas": {"GET": bazel.cas_get, "HEAD": bazel.cas_get, "PUT": bazel.cas_put},
                 "ac": {"GET": bazel.ac_get, "HEAD": bazel.ac_get, "PUT": bazel.ac_put}}


def parse_target(instances: Instances, path: str) -> Target:
    """Split a request path into instance, route and key (see the module docstring)."""
    segments = path.lstrip("/").split("/")
    if any(s in (".", "..") for s in segments) or any(not s for s in segments[:-1]):
        raise web.HTTPBadRequest(text=f"path {path!r} has empty, '.' or '..' segments\n")
    if len(segments) >= 2 and segments[-2] in _BAZEL_ROUTES and len(segments[-1]) == 64:
        name = "/".join(segments[:-2])
        return Target(_instance(instances, name, path), segments[-2], check_hash(segments[-1]))
    served = set(instances.names())
    for cut in range(len(segments) - 1, 0, -1):
        name = "/".join(segments[:cut])
        if name in served:
            return Target(_instance(instances, name, path), "opaque", "/".join(segments[cut:]))
    return Target(_instance(instances, "", path), "opaque", "/".join(segments))


def _instance(instances: Instances, name: str, path: str) -> Instance:
    try:
        return instances.get(name)
    except CasbahError:
        served = ", ".join(repr(n) for n in instances.names())
        raise web.HTTPNotFound(text=f"{path}: no instance {name!r} here (served: {served})\n") from None


class HttpFront:
    """The aiohttp application and its listener; `start` binds, `stop` drains."""

    def __init__(self, config: ServerConfig, instances: Instances, loader: StorageLoader) -> None:
        self.config = config
        opaque = {}
        for name, inst in config.instances.items():
            node = loader.build(inst.opaque_store or "opaque", f"instances.{name!r}.opaque-store")
            opaque[name] = OpaqueStore(node, name)
        self.state = HttpState(instances, opaque, Path(config.data_dir) / "http-tmp")
        self.state.spool_dir.mkdir(parents=True, exist_ok=True)
        self.app = web.Application(middlewares=[self._errors])
        self.app.router.add_route("*", "/{path:.*}", self._dispatch)
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        target = parse_target(self.state.instances, request.path)
        request["route"] = target.route
        if target.route == "opaque":
            handler: Any = webdav.HANDLERS.get(request.method)
        else:
            handler = _BAZEL_ROUTES[target.route].get(request.method)
        if handler is None:
            allowed = webdav.DAV_METHODS if target.route == "opaque" else "GET, HEAD, PUT"
            raise web.HTTPMethodNotAllowed(request.method, [m.strip() for m in allowed.split(",")])
        return await handler(self.state, request, target)

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """`casbah.errors` to HTTP statuses (one table), counting every answer."""
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except CasbahError as exc:
            status = _HTTP_STATUS.get(status_code(exc), 500)
            log.debug("HTTP %s %s: %d %s", request.method, request.path, status, exc)
            raise _http_error(status, exc) from None
        except (asyncio.IncompleteReadError, web.RequestPayloadError) as exc:
            status = 400  # the body ended before its Content-Length, or its chunking is broken
            raise web.HTTPBadRequest(text=f"the request body is incomplete: {exc}\n") from None
        except ConnectionResetError:
            status = 499  # the client went away mid-body: nothing was stored, nobody to answer
            log.debug("HTTP %s %s: the client went away", request.method, request.path)
            raise web.HTTPBadRequest(text="the connection was lost\n") from None
        except Exception as exc:
            log.exception("HTTP %s %s failed unexpectedly", request.method, request.path)
            raise web.HTTPInternalServerError(text=f"internal error: {type(exc).__name__}: {exc}\n") from None
        finally:
            REQUESTS.labels(request.method, request.get("route", "other"), str(status)).inc()

    async def start(self, address: str, reuse_port: bool = False) -> str:
        """Listen on `HOST:PORT` (port 0: any), with the server's TLS settings; returns the URL."""
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"http-listen: want HOST:PORT, got {address!r}")
        host = host.strip("[]")
        context = _ssl_context(self.config)
        # auto_decompress off: bodies are decoded here, bounded, and only in the encodings we name.
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False, auto_decompress=False,
                                    shutdown_timeout=self.config.grace_seconds)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, int(port), ssl_context=context, reuse_port=reuse_port or None)
        await site.start()
        bound = port
        server = getattr(site, "_server", None)
        if server is not None and server.sockets:
            bound = str(server.sockets[0].getsockname()[1])
        self.url = f"{'https' if context else 'http'}://{address.rpartition(':')[0]}:{bound}"
        return self.url

    async def stop(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()


def _http_error(status: int, exc: CasbahError) -> web.HTTPException:
    text = f"{exc}\n"
    if status == 401:
        return web.HTTPUnauthorized(text=text, headers={"WWW-Authenticate": 'Bearer realm="casbah"'})
    if status == 503:
        return web.HTTPServiceUnavailable(text=text, headers={"Retry-After": "1"})
    cls = {400: web.HTTPBadRequest, 403: web.HTTPForbidden, 404: web.HTTPNotFound, 409: web.HTTPConflict,
           412: web.HTTPPreconditionFailed, 416: web.HTTPRequestRangeNotSatisfiable,
           501: web.HTTPNotImplemented, 504: web.HTTPGatewayTimeout}.get(status, web.HTTPInternalServerError)
    return cls(text=text)


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """The gRPC listeners' certificate and key (and client CA: mTLS) for HTTPS."""
    if not (config.tls_cert and config.tls_key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
