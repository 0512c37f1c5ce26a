"""The status page and `/metrics` under the access control of gRPC, when auth is configured.

The page shows digests, stored file names, output paths and asset URIs: with
`auth.tokens`/`auth.jwt` set, it answers only callers that the gRPC side would let
read.  A caller proves itself with the same bearer token (`Authorization: Bearer …`,
as a Prometheus scraper sends it) or with a cookie set by a small login form (for a
browser).  `/api/lookup` and `/api/asset` need the read scope on the instance they
look into; the other routes need the read scope on some instance.  `/healthz`
answers everyone (it says only "ok"), as gRPC health does.

With no auth configured nothing changes: the page stays open, and `metrics-listen`
is still meant for loopback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from casbah.errors import Unauthenticated
from casbah.server.auth import Authorizer, Identity

COOKIE = "casbah_token"
#: Routes that answer without credentials.
OPEN_ROUTES = frozenset({"/healthz", "/login"})
#: Routes that look into one instance (named by `?instance=`).
INSTANCE_ROUTES = frozenset({"/api/lookup", "/api/asset"})

_FORM = """<!doctype html>
<html><head><meta charset="utf-8"><title>casbah: sign in</title></head>
<body style="font-family: sans-serif; max-width: 28em; margin: 4em auto">
<h1>casbah</h1>
<p>This server needs credentials for its status page. Paste a token with the read scope.</p>
{error}
<form method="post" action="/login">
<input type="password" name="token" autocomplete="off" size="40" autofocus>
<button type="submit">Sign in</button>
</form></body></html>
"""


class _HttpCall:
    """What `Authorizer.identify` reads from a gRPC context, taken from an HTTP request."""

    def __init__(self, token: str | None, peer: str) -> None:
        self._token = token
        self._peer = peer

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self._token}")] if self._token is not None else []

    def auth_context(self) -> dict[str, Any]:
        return {}  # no client certificates on the HTTP side

    def peer(self) -> str:
        return self._peer


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is not None:
        scheme, _, rest = header.partition(" ")
        if scheme.lower() != "bearer" or not rest.strip():
            raise Unauthenticated("the Authorization header must be 'Bearer <token>'")
        return rest.strip()
    return request.cookies.get(COOKIE) or None


def _identity(authorizer: Authorizer, request: web.Request) -> Identity:
    return authorizer.identify(_HttpCall(_token(request), request.remote or "?"))


def _may_read(authorizer: Authorizer, identity: Identity, instance: str) -> bool:
    if identity is authorizer.anonymous:
        identity = authorizer.anonymous_for(instance)
    return identity.allows("read", instance)


def access_middleware(authorizer: Authorizer, names: Callable[[], list[str]]) -> Callable:
    """An aiohttp middleware enforcing the rules in the module docstring."""

    @web.middleware
    async def middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
        path = request.path
        if path in OPEN_ROUTES:
            return await handler(request)
        try:
            identity = _identity(authorizer, request)
        except Unauthenticated as exc:
            return _refused(request, 401, str(exc))
        if path in INSTANCE_ROUTES:
            allowed = _may_read(authorizer, identity, request.query.get("instance", ""))
        else:
            allowed = any(_may_read(authorizer, identity, name) for name in names())
        if not allowed:
            if identity.authenticated:
                return _refused(request, 403, f"{identity.name} has no read scope here")
            return _refused(request, 401, "credentials with the read scope needed")
        return await handler(request)

    return middleware


def _refused(request: web.Request, status: int, message: str) -> web.StreamResponse:
    if status == 401 and request.path in ("/", "/index.html") and request.method == "GET":
        raise web.HTTPFound("/login")
    return web.json_response({"error": message}, status=status,
                             headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


def add_login_routes(app: web.Application, authorizer: Authorizer) -> None:
    """GET /login shows the form; POST /login checks the token and sets the cookie."""

    async def form(request: web.Request) -> web.Response:
        return web.Response(text=_FORM.format(error=""), content_type="text/html")

    async def login(request: web.Request) -> web.Response:
        data = await request.post()
        token = str(data.get("token", "")).strip()
        try:
            identity = authorizer.identify(_HttpCall(token, request.remote or "?")) if token else None
        except Unauthenticated:
            identity = None
        if identity is None or not identity.authenticated:
            error = "<p style='color: #a00'>That token is not valid.</p>"
            return web.Response(text=_FORM.format(error=error), content_type="text/html", status=401)
        response = web.HTTPFound("/")
        response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, path="/")
        raise response

    app.router.add_get("/login", form)
    app.router.add_post("/login", login)
