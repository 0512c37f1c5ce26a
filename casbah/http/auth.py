"""The HTTP front's access control: the gRPC `Authorizer`, fed from an HTTP request.

The `Authorizer` reads a gRPC call's metadata (`authorization: Bearer …`), its TLS
auth context (the client certificate) and its peer.  `HttpCallContext` offers the
same three methods for an aiohttp request, so both fronts share one implementation of
tokens, JWTs, mTLS subjects, per-instance anonymous rules and audit lines.

HTTP Basic carries the same tokens: the password is the token, the user name is
ignored (ccache and sccache put credentials in the URL, `http://user:TOKEN@host/`,
and curl sends them as Basic).  An unknown scheme is refused like a malformed gRPC
`authorization` header.
"""

from __future__ import annotations

import base64
import binascii
import ssl

from aiohttp import web

from casbah.errors import PermissionDenied, Unauthenticated
from casbah.server.auth import Authorizer, Identity


class HttpCallContext:
    """What `Authorizer.identify`/`check` read from a gRPC context, for an HTTP request."""

    def __init__(self, request: web.Request) -> None:
        self._request = request

    def invocation_metadata(self) -> list[tuple[str, str]]:
        header = self._request.headers.get("Authorization")
        if header is None:
            return []
        scheme, _, rest = header.partition(" ")
        if scheme.lower() == "basic":
            return [("authorization", f"Bearer {_basic_password(rest.strip())}")]
        return [("authorization", header)]

    def auth_context(self) -> dict[str, list[bytes]]:
        transport = self._request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        if ssl_object is None:
            return {}
        der = ssl_object.getpeercert(binary_form=True)
        if not der:
            return {}
        # Verified against the client CA by the handshake (CERT_REQUIRED), as gRPC's is.
        return {"x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]}

    def peer(self) -> str:
        return f"http:{self._request.remote or '?'}"


def _basic_password(encoded: str) -> str:
    try:
        decoded = base64.b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("the Basic credentials are not base64 of 'user:password'") from None
    _, sep, password = decoded.partition(":")
    if not sep or not password:
        raise Unauthenticated("HTTP Basic needs the token as the password ('user:TOKEN')")
    return password


def authorize(authorizer: Authorizer, request: web.Request, instance: str, write: bool, what: str,
              detail: str = "", action_cache: bool = False) -> Identity:
    """Check the caller like gRPC does; raise the HTTP answer when refused.

    No or invalid credentials: 401 with a `WWW-Authenticate` challenge (curl, ccache
    and sccache then know to send credentials); valid credentials without the scope or
    the instance: 403.
    """
    try:
        return authorizer.check(HttpCallContext(request), instance, write, what, detail,
                                action_cache=action_cache)
    except Unauthenticated as exc:
        raise web.HTTPUnauthorized(
            text=f"{exc}\n", headers={"WWW-Authenticate": 'Bearer realm="casbah", Basic realm="casbah"'},
        ) from None
    except PermissionDenied as exc:
        raise web.HTTPForbidden(text=f"{exc}\n") from None
