"""Opaque entries by path: ccache's `flat` and `subdirs` layouts, and sccache's WebDAV.

ccache `flat` PUTs/GETs `<prefix>/<key>`, `subdirs` `<prefix>/<2 chars>/<rest>`; sccache
first round-trips `/.sccache_check`, then `MKCOL`s `/a/`, `/a/b/`, `/a/b/c/` and PUTs
`/a/b/c/<key>`.  All of them are keys of the instance's opaque namespace (`kv.py`).

WebDAV is implemented as far as these clients need: collections are implicit (a key's
"directories" exist as soon as anything could be stored below them), so `MKCOL` always
succeeds (201) and stores nothing; `PROPFIND` reports an entry (with its length) or a
collection; there is no listing, `COPY`, `MOVE` or locking.
"""

from __future__ import annotations

from email.utils import formatdate
from xml.sax.saxutils import escape

from aiohttp import web

from casbah.http.auth import authorize
from casbah.http.common import HttpState, Target, body_encoding, request_chunks, send_stream
from casbah.http.kv import EntryNotFound

DAV_METHODS = "OPTIONS, GET, HEAD, PUT, DELETE, MKCOL, PROPFIND"


def _check(state: HttpState, request: web.Request, target: Target, write: bool) -> None:
    what = f"HTTP {request.method} (opaque)"
    authorize(state.instances.authorizer, request, target.instance.name, write, what, target.key,
              action_cache=write)
    if write:
        target.instance.check_writable(what)


def _entry_key(target: Target) -> str:
    if not target.key or target.key.endswith("/"):
        raise web.HTTPMethodNotAllowed(target.key or "/", ["OPTIONS", "MKCOL", "PROPFIND"],
                                       text="a collection holds no data\n")
    return target.key


async def get(state: HttpState, request: web.Request, target: Target) -> web.StreamResponse:
    _check(state, request, target, write=False)
    try:
        chunks = await state.opaque[target.instance.name].open(_entry_key(target))
    except EntryNotFound:
        raise web.HTTPNotFound(text=f"no entry {target.key!r}\n") from None
    if request.method == "HEAD":
        return web.Response(status=200)
    return await send_stream(request, chunks, size=None)


async def put(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check(state, request, target, write=True)
    key = _entry_key(target)
    if body_encoding(request) != "identity":
        raise web.HTTPUnsupportedMediaType(text="encoded bodies are accepted for /cas/ only\n")
    await state.opaque[target.instance.name].put(key, request_chunks(request))
    return web.Response(status=201)


async def delete(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check(state, request, target, write=True)
    if not await state.opaque[target.instance.name].delete(_entry_key(target)):
        raise web.HTTPNotFound(text=f"no entry {target.key!r}\n")
    return web.Response(status=204)


async def mkcol(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check(state, request, target, write=True)
    return web.Response(status=201)


async def propfind(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check(state, request, target, write=False)
    if 0 < (request.content_length or 0) <= 64 << 10:
        await request.read()  # the properties asked for: every answer carries the same few
    href = escape(request.path)
    if target.key and not target.key.endswith("/"):
        try:
            chunks = await state.opaque[target.instance.name].open(target.key)
        except EntryNotFound:
            raise web.HTTPNotFound(text=f"no entry {target.key!r}\n") from None
        length = 0
        async for chunk in chunks:  # opaque nodes do not keep lengths apart: count them
            length += len(chunk)
        props = f"<D:resourcetype/><D:getcontentlength>{length}</D:getcontentlength>"
    else:
        props = "<D:resourcetype><D:collection/></D:resourcetype>"
    # Opaque nodes keep no modification times; clients (OpenDAL, in sccache) insist on one.
    props += f"<D:getlastmodified>{formatdate(usegmt=True)}</D:getlastmodified>"
    body = (
        '<?xml version="1.0" encoding="utf-8"?>\n<D:multistatus xmlns:D="DAV:"><D:response>'
        f"<D:href>{href}</D:href><D:propstat><D:prop>{props}</D:prop>"
        "<D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>\n"
    )
    return web.Response(status=207, body=body.encode(), content_type="application/xml", charset="utf-8")


async def options(state: HttpState, request: web.Request, target: Target) -> web.Response:
    return web.Response(status=200, headers={"DAV": "1", "Allow": DAV_METHODS})


HANDLERS = {"GET": get, "HEAD": get, "PUT": put, "DELETE": delete, "MKCOL": mkcol, "PROPFIND": propfind,
            "OPTIONS": options}

