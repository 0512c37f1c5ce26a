"""The status page and its JSON API, served on the HTTP side (`casbah.server.http`).

The page reads the live `Observability` state and the storage objects directly,
with no IPC and no second process.  Everything it needs (HTML, JS, CSS) is under
`casbah/server/static/` and served from here: the page must work on a build farm
with no Internet access, so nothing comes from a CDN.

Routes:
  /               the status page
  /api/status     instances, their storage graphs with stats, hit rates per minute
  /api/requests   recent calls and recent invocations (from RequestMetadata)
  /api/lookup     ?instance=&digest=HASH/SIZE[&function=] -> present? size; a Directory's entries
  /api/asset      ?instance=&uri=[&function=] -> the assets a URI maps to

The page and its API reveal digests, file names of stored trees and asset URIs
(never blob contents): with auth configured they answer only callers with the
read scope (`casbah.server.http_auth`), and `metrics-listen` belongs on loopback
or an operators' network either way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from aiohttp import web
from google.protobuf.message import DecodeError

from casbah.assets.index import AssetKind
from casbah.digest import Digest, DigestFunction, is_empty_blob
from casbah.errors import CasbahError, echo
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.server.observability import Observability, invocation_summaries, recent_requests
from casbah.server.status_data import status_document
from casbah.storage.base import Storage

STATIC = Path(__file__).resolve().parent / "static"
#: Largest blob the lookup reads to see whether it is a Directory or an ActionResult.
MAX_PARSE = 4 * 1024 * 1024
ASSET_LIMIT = 20
#: Where the HTTP application keeps the server's `Observability`.
OBSERVABILITY = web.AppKey("observability", Observability)
_OBS = OBSERVABILITY


def add_routes(app: web.Application) -> None:
    """The page, its static files and its API, on an app holding `OBSERVABILITY`."""
    app.router.add_get("/", _index)
    app.router.add_get("/api/status", _status)
    app.router.add_get("/api/requests", _requests)
    app.router.add_get("/api/lookup", _lookup)
    app.router.add_get("/api/asset", _asset)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)


# -- handlers ---------------------------------------------------------------------------


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _status(request: web.Request) -> web.Response:
    return web.json_response(await status_document(request.app[_OBS]))


async def _requests(request: web.Request) -> web.Response:
    obs = request.app[_OBS]
    limit = _int_param(request, "limit", 100, 1, 500)
    return web.json_response({"recent": recent_requests(obs, limit), "invocations": invocation_summaries(obs)})


async def _lookup(request: web.Request) -> web.Response:
    """Is a digest stored, and what is it: a Directory (browsable) or an action with a result."""
    obs = request.app[_OBS]
    inst = _instance(obs, request)
    function = _function(request)
    text = request.query.get("digest", "").strip()
    try:
        digest = Digest.parse(text, function)
    except CasbahError as exc:
        raise _bad_request(str(exc)) from None
    present = is_empty_blob(digest) or not await inst.cas.find_missing([digest])
    answer: dict[str, Any] = {"instance": inst.name, "digest": str(digest), "function": function.value,
                              "present": present, "size": digest.size, "directory": None, "action_result": None}
    if present and digest.size <= MAX_PARSE:
        try:
            data = b"" if is_empty_blob(digest) else await inst.cas.read_bytes(digest)
        except CasbahError:
            data = None  # evicted between the two calls: report what find_missing said
        if data is not None:
            answer["directory"] = await _directory(inst.cas, data, function)
    try:
        result = await inst.action_cache.get(digest)
    except Exception:  # a miss (ActionResultNotFound) or a backend that cannot answer: no entry shown
        result = None
    if result is not None:
        answer["action_result"] = _action_result(result)
    return web.json_response(answer)


async def _asset(request: web.Request) -> web.Response:
    """What a Remote Asset URI maps to: every pushed blob and directory naming it."""
    obs = request.app[_OBS]
    inst = _instance(obs, request)
    function = _function(request)
    uri = request.query.get("uri", "").strip()
    if not uri:
        raise _bad_request("uri is required")
    settings = inst.extras.get("asset")
    index = getattr(settings, "index", None)
    if index is None:
        raise _bad_request(f"instance {inst.name!r} has no asset index")
    now = time.time()
    assets = []
    for kind in (AssetKind.BLOB, AssetKind.DIRECTORY):
        records = await index.candidates(kind, [uri], {}, function, limit=ASSET_LIMIT)
        missing = await _missing(inst.cas, [r.digest for r in records])
        for record in records:
            assets.append({
                "kind": record.kind.value, "digest": str(record.digest), "size": record.digest.size,
                "uris": list(record.uris), "qualifiers": dict(record.qualifiers),
                "pushed_at": record.pushed_at, "expire_at": record.expire_at, "expired": record.expired(now),
                "present": record.digest not in missing,
            })
    assets.sort(key=lambda a: a["pushed_at"], reverse=True)
    return web.json_response({"instance": inst.name, "uri": uri, "function": function.value, "assets": assets})


# -- helpers ----------------------------------------------------------------------------


async def _missing(cas: Storage, digests: list[Digest]) -> set[Digest]:
    """What the storage lacks, as the CAS API answers it: the empty blob (an empty file,
    an empty Directory) is present everywhere without being stored."""
    stored = [d for d in digests if not is_empty_blob(d)]
    return set(await cas.find_missing(stored)) if stored else set()


async def _directory(cas: Storage, data: bytes, function: DigestFunction) -> dict[str, Any] | None:
    """The blob's entries if it is a canonical Directory message, else None.

    Any byte string might parse as some protobuf; a blob counts as a Directory only
    when it round-trips byte for byte through canonical serialization and its names
    are valid path components, which arbitrary data practically never does.
    """
    try:
        directory = re_pb2.Directory.FromString(data)
    except (DecodeError, ValueError):
        return None
    if directory.SerializeToString(deterministic=True) != data:
        return None
    names = [e.name for e in (*directory.files, *directory.directories, *directory.symlinks)]
    if any(not n or "/" in n or n in (".", "..") for n in names):
        return None
    children = [Digest(f.digest.hash, f.digest.size_bytes, function) for f in directory.files]
    children += [Digest(d.digest.hash, d.digest.size_bytes, function) for d in directory.directories]
    try:
        missing = await _missing(cas, children)
    except CasbahError:
        return None  # child digests that are not valid digests: not a Directory after all
    return {
        "files": [{"name": f.name, "digest": f"{f.digest.hash}/{f.digest.size_bytes}", "size": f.digest.size_bytes,
                   "executable": f.is_executable,
                   "present": Digest(f.digest.hash, f.digest.size_bytes, function) not in missing}
                  for f in directory.files],
        "directories": [{"name": d.name, "digest": f"{d.digest.hash}/{d.digest.size_bytes}",
                         "present": Digest(d.digest.hash, d.digest.size_bytes, function) not in missing}
                        for d in directory.directories],
        "symlinks": [{"name": s.name, "target": s.target} for s in directory.symlinks],
    }


def _action_result(data: bytes) -> dict[str, Any] | None:
    try:
        result = re_pb2.ActionResult.FromString(data)
    except DecodeError:
        return None
    return {
        "exit_code": result.exit_code,
        "output_files": [{"path": f.path, "digest": f"{f.digest.hash}/{f.digest.size_bytes}"}
                         for f in result.output_files],
        "output_directories": [{"path": d.path, "tree_digest": f"{d.tree_digest.hash}/{d.tree_digest.size_bytes}"}
                               for d in result.output_directories],
        "stdout_digest": f"{result.stdout_digest.hash}/{result.stdout_digest.size_bytes}"
        if result.HasField("stdout_digest") else None,
        "stderr_digest": f"{result.stderr_digest.hash}/{result.stderr_digest.size_bytes}"
        if result.HasField("stderr_digest") else None,
        "worker": result.execution_metadata.worker,
    }


def _instance(obs: Observability, request: web.Request):
    name = request.query.get("instance", "")
    for inst in obs.instances:
        if inst.name == name:
            return inst
    raise _bad_request(f"unknown instance {echo(name)}; served: {', '.join(repr(i.name) for i in obs.instances)}")


def _function(request: web.Request) -> DigestFunction:
    value = request.query.get("function", "sha256").lower()
    try:
        return DigestFunction(value)
    except ValueError:
        raise _bad_request(f"unknown digest function {echo(value)} ({', '.join(DigestFunction)})") from None


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(request.query.get(name, default))))
    except ValueError:
        raise _bad_request(f"{name} must be an integer") from None


def _bad_request(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")
