"""The HTTP side of a server's operational endpoints (`casbah.server.http`): the aiohttp
app serving /metrics, /healthz and the status page.  A module of its own so that a
server without `--metrics-listen` never imports aiohttp or prometheus_client's exposition.

  /metrics        Prometheus text format (storage gauges refreshed per scrape)
  /healthz        200 "ok" while serving, 503 while shutting down
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from casbah.server import status_page
from casbah.server.auth import Authorizer
from casbah.server.collectors import refresh_storage_snapshot
from casbah.server.http_auth import access_middleware, add_login_routes
from casbah.server.observability import Observability

_OBS = status_page.OBSERVABILITY


def create_app(obs: Observability, authorizer: Authorizer | None = None) -> web.Application:
    """With auth configured, every route but /healthz needs what gRPC would need (`http_auth`)."""
    guard = authorizer if authorizer is not None and not authorizer.open else None
    names = [inst.name for inst in obs.instances]
    app = web.Application(middlewares=[access_middleware(guard, lambda: names)] if guard is not None else [])
    if guard is not None:
        add_login_routes(app, guard)
    app[_OBS] = obs
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    status_page.add_routes(app)
    return app


async def start_http_server(obs: Observability, address: str, worker: int | None = None,
                            authorizer: Authorizer | None = None) -> tuple[web.AppRunner, str]:
    """Bind `HOST:PORT` (the port plus the worker index under `--workers`: each worker
    process has its own counters, so each needs its own scrape target)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"metrics-listen {address!r}: want HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    port = int(port_text) + (worker or 0) if int(port_text) else 0
    runner = web.AppRunner(create_app(obs, authorizer), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}"


async def _metrics(request: web.Request) -> web.Response:
    await refresh_storage_snapshot(request.app[_OBS])
    body = generate_latest(REGISTRY)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    if request.app[_OBS].shutting_down:
        return web.Response(status=503, text="shutting down\n")
    return web.Response(text="ok\n")
