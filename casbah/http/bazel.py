"""Bazel's HTTP cache protocol: `/cas/<sha256>` and `/ac/<sha256>`.

`/cas/` is the instance's CAS: a PUT is verified against its hash (400 and nothing
stored on a mismatch) while it streams into storage; GET supports `Range` and
`Accept-Encoding: zstd`; HEAD answers presence and size.

`/ac/` is shared by two kinds of clients: Bazel stores serialized ActionResults there,
ccache (`layout=bazel`) its own result files.  A PUT body that *is* an ActionResult —
it parses, re-serializes to the very same bytes, and every digest in it is well-formed
(see `as_action_result`) — goes to the instance's ActionCache and is served with the
same completeness check as gRPC GetActionResult.  Any other body goes to the opaque
namespace under `ac/<hash>`, never to the ActionCache: a REAPI client can never be
handed a ccache file as an action result.  A GET tries the ActionCache, then the
opaque namespace.

ActionCache keys: the HTTP protocol names an action by hash alone, so its entries are
stored under the digest `<hash>/0`; a GET that misses there also tries the action's
real size when CAS knows it (Bazel over gRPC uploads the Action), so entries written
over gRPC are found too.
"""

from __future__ import annotations

import logging

from aiohttp import web
from google.protobuf.message import DecodeError

from casbah.digest import Digest, DigestFunction, is_empty_blob
from casbah.errors import ActionResultNotFound, InvalidArgument, NotFound
from casbah.http.auth import authorize
from casbah.http.common import (
    HttpState,
    Spooled,
    Target,
    body_encoding,
    hash_body,
    mismatch,
    parse_range,
    request_chunks,
    send_stream,
    wants_zstd,
)
from casbah.http.kv import EntryNotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.server.action_cache import checked_action_result, referenced_digests
from casbah.storage.base import empty_stream

log = logging.getLogger("casbah.http")

SHA256 = DigestFunction.SHA256
#: An ActionResult is small (Bazel does not inline outputs over HTTP); a larger `/ac/`
#: body is taken as opaque without being buffered for the check.
MAX_ACTION_RESULT = 4 << 20


def _check(state: HttpState, request: web.Request, target: Target, service: str, write: bool,
           action_cache: bool = False) -> None:
    name = target.instance.name
    state.instances.get(name, service)  # the instance serves this service (UNIMPLEMENTED: 501)
    what = f"HTTP {request.method} /{target.route}/"
    authorize(state.instances.authorizer, request, name, write, what, f"{target.route} {target.key}",
              action_cache=action_cache)
    if write:
        target.instance.check_writable(what)


# -- /cas/ ---------------------------------------------------------------------------------


async def cas_get(state: HttpState, request: web.Request, target: Target) -> web.StreamResponse:
    _check(state, request, target, "cas", write=False)
    digest = await _resolve(state, target)
    headers = {"Accept-Ranges": "bytes"}
    if request.method == "HEAD":
        return web.Response(headers={**headers, "Content-Length": str(digest.size)})
    span = parse_range(request.headers.get("Range"), digest.size) if digest.size else None
    if span is not None:
        offset, count = span
        chunks = await target.instance.cas.read(digest, offset, count)
        headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{digest.size}"
        return await send_stream(request, chunks, size=count, status=206, headers=headers)
    chunks = empty_stream() if is_empty_blob(digest) else await target.instance.cas.read(digest)
    return await send_stream(request, chunks, size=digest.size, headers=headers,
                             compress=digest.size > 0 and wants_zstd(request))


async def _resolve(state: HttpState, target: Target) -> Digest:
    """The blob's digest with its size, or 404."""
    empty = Digest.of(b"")
    if target.key == empty.hash:
        return empty
    digest = await state.sizes.resolve(target.instance.cas, target.key)
    if digest is None or await target.instance.cas.find_missing([digest]):
        raise NotFound(f"blob {target.key} is not in CAS")
    return digest


async def cas_put(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check(state, request, target, "cas", write=True)
    cas = target.instance.cas
    encoding = body_encoding(request)
    length = request.content_length
    if encoding == "identity" and length is not None:
        digest = Digest(target.key, length, SHA256)
        if is_empty_blob(digest) or await cas.has(digest):
            # Stored already (storage would skip the body unread): still refuse a wrong one.
            got = await hash_body(request)
            if got != digest:
                raise mismatch(target.key, got)
        else:
            await cas.write(digest, request_chunks(request))  # verified as it streams: DigestMismatch → 400
    else:
        spooled = await Spooled.receive(request, state.spool_dir, encoding)
        try:
            digest = spooled.digest
            if digest.hash != target.key:
                raise mismatch(target.key, digest)
            if not is_empty_blob(digest):
                await cas.write(digest, spooled.chunks())
        finally:
            spooled.close()
    state.sizes.remember(digest)
    return web.Response(status=200)


# -- /ac/ ----------------------------------------------------------------------------------


def as_action_result(data: bytes) -> re_pb2.ActionResult | None:
    """The body as an ActionResult, or None when it is something else (an opaque value).

    Protobuf parses many byte strings "successfully", so parsing alone proves nothing.
    A body counts as an ActionResult when it parses, re-serializes deterministically to
    exactly the same bytes (what every protobuf library writes for a message with known
    fields; an arbitrary file almost never round-trips) and names only well-formed
    digests.  The empty body is the empty ActionResult.
    """
    result = re_pb2.ActionResult()
    try:
        result.ParseFromString(data)
    except DecodeError:
        return None
    if result.SerializeToString(deterministic=True) != data:
        return None
    try:
        referenced_digests(result, SHA256)
    except InvalidArgument:
        return None
    return result


async def ac_put(state: HttpState, request: web.Request, target: Target) -> web.Response:
    _check_opaque(state, request, target, write=True)  # before reading a byte of the body
    store = state.opaque[target.instance.name]
    encoding = body_encoding(request)
    length = request.content_length
    if encoding == "identity" and length is not None and length <= MAX_ACTION_RESULT:
        data = await request.content.readexactly(length) if length else b""
        if as_action_result(data) is not None:
            state.instances.get(target.instance.name, "action-cache")
            await target.instance.action_cache.put(Digest(target.key, 0, SHA256), data)
        else:
            await store.put_bytes(f"ac/{target.key}", data)
        return web.Response(status=200)
    if encoding == "zstd":
        raise web.HTTPUnsupportedMediaType(text="zstd bodies are accepted for /cas/ only\n")
    # Too large for an ActionResult: an opaque value, streamed.
    await store.put(f"ac/{target.key}", request_chunks(request))
    return web.Response(status=200)


async def ac_get(state: HttpState, request: web.Request, target: Target) -> web.StreamResponse:
    _check_opaque(state, request, target, write=False)
    instance = target.instance
    if "action-cache" in instance.services:
        for action in await _action_keys(state, target):
            try:
                data = await instance.action_cache.get(action)
            except ActionResultNotFound:
                continue
            result = await checked_action_result(instance, data, action, SHA256)  # incomplete: 404
            for digest in referenced_digests(result, SHA256):
                state.sizes.remember(digest)  # Bazel GETs these next, by hash alone
            body = result.SerializeToString(deterministic=True)
            if request.method == "HEAD":
                return web.Response(headers={"Content-Length": str(len(body))})
            return web.Response(body=body, content_type="application/octet-stream")
    store = state.opaque[instance.name]
    try:
        chunks = await store.open(f"ac/{target.key}")
    except EntryNotFound:
        raise NotFound(f"no ActionCache entry for {target.key}") from None
    if request.method == "HEAD":
        return web.Response(status=200)
    return await send_stream(request, chunks, size=None)


async def _action_keys(state: HttpState, target: Target) -> list[Digest]:
    keys = [Digest(target.key, 0, SHA256)]
    action = await state.sizes.resolve(target.instance.cas, target.key)
    if action is not None and action.size:
        keys.append(action)
    return keys


def _check_opaque(state: HttpState, request: web.Request, target: Target, write: bool) -> None:
    """Access to an opaque entry: the instance's read/write scope, like any cache entry
    (writes count as ActionCache writes for `action-cache-writers: authenticated`)."""
    name = target.instance.name
    what = f"HTTP {request.method} /{target.route}/"
    authorize(state.instances.authorizer, request, name, write, what, f"{target.route} {target.key}",
              action_cache=write)
    if write:
        target.instance.check_writable(what)
