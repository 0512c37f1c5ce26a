"""Remote Asset API v1: Fetch (FetchBlob, FetchDirectory) and Push (PushBlob, PushDirectory).

Request problems are RPC errors; a miss is NOT_FOUND in the response `status`,
as the spec says.  Bazel 4.2 ignores that field and takes any OK call as a hit
(then fails with a confusing checksum error), so for callers whose
RequestMetadata names the tool `bazel` a miss is an RPC NOT_FOUND instead
(`asset-miss: auto`, the default; `status` or `rpc-error` force one behaviour).

An answer is never an asset whose content has left CAS: a blob must exist, a
directory's whole tree must (checked, with a cache of recently complete trees).
Nor is it a tree that breaks the REAPI's name rules: Push refuses one
(INVALID_ARGUMENT), Fetch of one planted another way answers FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.rpc import code_pb2, status_pb2

from casbah.assets.index import AssetIndex, AssetKind, AssetRecord
from casbah.digest import Digest, is_empty_blob, make_digest
from casbah.errors import (
    CasbahError,
    FailedPrecondition,
    InvalidArgument,
    InvalidTree,
    NotFound,
    code_to_int,
    echo,
    status_code,
)
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.server.base import Instance, Instances, rpc
from casbah.tree import CompleteTrees
from casbah.tree_rules import served

if TYPE_CHECKING:
    from casbah.assets.origin import OriginFetcher

log = logging.getLogger(__name__)

REQUEST_METADATA_KEY = "build.bazel.remote.execution.v2.requestmetadata-bin"
#: Qualifiers an origin fetch knows how to honour; the index honours any qualifier.
ORIGIN_QUALIFIERS = frozenset({"resource_type", "checksum.sri", "vcs.commit", "vcs.branch"})
#: What an origin fetch verifies (and so may index), per kind: the content pin it
#: checked (`checksum.sri` for a download, `vcs.commit` for git), never the other
#: kind's pin, which it did not look at.  `vcs.branch` is accepted on a request but not
#: indexed, since the fetch checks the commit, not which branch holds it.
#: `resource_type` is kept: it only narrows later matches of the same URI (whose
#: content it is), so it cannot make another URI or pin resolve to these bytes, and
#: dropping it would make every fetch that names it miss the index.
ORIGIN_INDEXED = {
    AssetKind.BLOB: frozenset({"resource_type", "checksum.sri"}),
    AssetKind.DIRECTORY: frozenset({"resource_type", "vcs.commit"}),
}


@dataclass
class AssetSettings:
    """Per-instance asset configuration, kept in `Instance.extras['asset']`."""

    index: AssetIndex
    origin: OriginFetcher | None = None
    miss: str = "auto"  # auto | status | rpc-error


def _settings(instance: Instance) -> AssetSettings:
    return instance.extras["asset"]  # type: ignore[return-value]


def validate(uris, qualifiers) -> tuple[list[str], dict[str, str]]:
    """The request checks BuildStream relies on when it probes with empty requests."""
    if not uris:
        raise InvalidArgument("at least one URI is required")
    if any(not uri for uri in uris):
        raise InvalidArgument("empty URI in request")
    names: dict[str, str] = {}
    for q in qualifiers:
        if not q.name:
            raise InvalidArgument("qualifier with an empty name")
        if q.name in names:
            raise InvalidArgument(f"qualifier {echo(q.name)} appears more than once")
        names[q.name] = q.value
    return list(dict.fromkeys(uris)), names


def _timestamp_seconds(message) -> float | None:
    return message.seconds + message.nanos / 1e9 if (message.seconds or message.nanos) else None


def _tool_name(context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_METADATA_KEY:
            try:
                return re_pb2.RequestMetadata.FromString(value).tool_details.tool_name
            except Exception:
                return ""
    return ""


#: Candidates read from the index per round: a fetch almost always takes the first.
CANDIDATE_PAGE = 16


async def missing_content(instance: Instance, trees: CompleteTrees, kind: AssetKind, root: Digest,
                          blobs: tuple[Digest, ...] | list[Digest],
                          directories: tuple[Digest, ...] | list[Digest]) -> list[Digest]:
    """What an asset names that CAS lacks: its blob or tree, and the content it keeps alive.

    Push refuses an asset with missing content; Fetch skips one, because serving
    it would hand the client a digest (or references) it then cannot download.
    """
    must_exist = [d for d in ([root] if kind is AssetKind.BLOB else []) + list(blobs) if not is_empty_blob(d)]
    missing = list(await instance.cas.find_missing(must_exist)) if must_exist else []
    for tree in ([root] if kind is AssetKind.DIRECTORY else []) + list(directories):
        missing.extend(await trees.missing(instance.cas, tree))
    return missing


#: URIs only BuildStream 1.x uses; its CASCache takes any OK FetchDirectory as a hit.
BST1_URI_PREFIX = "urn:fdc:buildstream.build:2020:v1:"


def _wants_rpc_miss(context, uri: str) -> bool:
    """Clients that read a miss only from the RPC status (Bazel 4.2, BuildStream 1.x)."""
    return _tool_name(context) == "bazel" or uri.startswith(BST1_URI_PREFIX)


class FetchService(ra_grpc.FetchServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances
        self.trees = CompleteTrees()

    async def _complete(self, instance: Instance, record: AssetRecord) -> bool:
        """Whether the record's content is all in CAS; raises InvalidTree if its trees break the rules."""
        try:
            missing = await missing_content(instance, self.trees, record.kind, record.digest,
                                            record.references_blobs, record.references_directories)
        except InvalidTree:
            raise
        except InvalidArgument as exc:  # a malformed digest in the record: unusable
            log.warning("asset %s: content %s is corrupt: %s", record.uris[0], record.digest, exc)
            return False
        if missing:
            log.info("asset %s: %d blob(s) of %s left CAS (e.g. %s); skipping it",
                     record.uris[0], len(missing), record.digest, missing[0])
        return not missing

    async def _lookup(self, instance: Instance, kind: AssetKind, request
                      ) -> tuple[AssetRecord | None, str, CasbahError | None]:
        """(the newest usable record, the URI it answers, why a record was refused if none is usable).

        A record whose tree breaks the REAPI's name rules is never served: the next
        candidate is tried, and if none is usable the answer names the bad entry.
        """
        uris, qualifiers = validate(request.uris, request.qualifiers)
        function = instance.digest_function(request.digest_function)  # no digest to infer from: unset is sha256
        oldest = _timestamp_seconds(request.oldest_content_accepted)
        index = _settings(instance).index
        now = time.time()
        offset = 0
        refused: CasbahError | None = None
        while True:
            page = await index.candidates(kind, uris, qualifiers, function, limit=CANDIDATE_PAGE, offset=offset)
            for record in page:
                if record.expired(now) or (oldest is not None and record.pushed_at < oldest):
                    continue
                try:
                    complete = await self._complete(instance, record)
                except InvalidTree as exc:
                    log.warning("asset %s: refusing to serve %s: %s", record.uris[0], record.digest, exc)
                    refused = refused or served(exc)
                    continue
                if complete:
                    uri = next(u for u in uris if u in record.uris)
                    return record, uri, None
            if len(page) < CANDIDATE_PAGE:
                return None, uris[0], refused
            offset += CANDIDATE_PAGE

    async def _origin(self, instance: Instance, kind: AssetKind, request,
                      context) -> tuple[AssetRecord | None, str]:
        """On a miss: fetch from the origin if this instance allows it for one of the URIs."""
        settings = _settings(instance)
        if settings.origin is None:
            return None, ""
        from casbah.assets.origin import git_scheme  # only servers with an origin load it (startup time)

        uris, qualifiers = validate(request.uris, request.qualifiers)
        allowed = [u for u in uris if settings.origin.allowed(u)]
        if kind is AssetKind.BLOB:
            allowed = [u for u in allowed if u.startswith(("http://", "https://"))]
        else:
            allowed = [u for u in allowed if git_scheme(u) is not None]
        if not allowed:
            return None, ""
        unknown = sorted(set(qualifiers) - ORIGIN_QUALIFIERS)
        if unknown:
            raise InvalidArgument(f"qualifier {echo(unknown[0])} cannot be honoured by an origin fetch")
        function = instance.digest_function(request.digest_function)
        timeout = request.timeout.seconds + request.timeout.nanos / 1e9 or None
        last_error: CasbahError | None = None
        for uri in allowed:
            try:
                if kind is AssetKind.BLOB:
                    digest = await settings.origin.fetch_blob(
                        instance.cas, uri, qualifiers.get("checksum.sri"), function, timeout
                    )
                else:
                    commit = qualifiers.get("vcs.commit")
                    if commit is None:
                        # Not a malformed request (the index may hold the asset): a miss, explained.
                        raise NotFound(f"{uri}: an origin fetch of a directory needs a vcs.commit qualifier")
                    digest = await settings.origin.fetch_git(instance.cas, uri, commit, function, timeout)
            except InvalidArgument:
                raise
            except CasbahError as exc:
                log.warning("origin fetch of %s failed: %s", uri, exc)
                last_error = exc
                continue
            # Indexed under the one URI the content came from: the request's other URIs
            # may name anything (a URI the allow-list refuses included), and indexing
            # under them would let any caller decide what they resolve to.
            verified = tuple(sorted((n, v) for n, v in qualifiers.items() if n in ORIGIN_INDEXED[kind]))
            record = AssetRecord(kind, (uri,), verified, digest, pushed_at=time.time())
            await settings.index.put(record)
            self.instances.authorizer.audit_write(context, instance.name, f"OriginFetch{kind.value.capitalize()}",
                                                  f"{uri} -> {digest}")
            return record, uri
        if last_error is not None:
            raise last_error
        return None, ""

    async def _fetch(self, request, context, kind: AssetKind):
        instance = self.instances.get(request.instance_name, "asset", context, authorize=False)
        validate(request.uris, request.qualifiers)  # probes with empty requests get INVALID_ARGUMENT first
        self.instances.get(request.instance_name, "asset", context, what=f"Fetch{kind.value.capitalize()}",
                           detail=request.uris[0])
        # An index (or CAS) that cannot answer is the server's problem, not the asset's:
        # it stays an RPC error (UNAVAILABLE), which clients retry, never a "miss".
        record, uri, refused = await self._lookup(instance, kind, request)
        if record is None:
            try:
                record, uri = await self._origin(instance, kind, request, context)
            except InvalidArgument:
                raise
            except CasbahError as exc:  # the origin failed: a problem with this asset
                return self._miss(instance, context, kind, refused or exc, request.uris[0])
        if record is None:
            miss = refused or NotFound(f"no {kind.value} asset for {list(request.uris)} with the requested qualifiers")
            return self._miss(instance, context, kind, miss, request.uris[0])
        response = _response(kind)(
            status=status_pb2.Status(code=code_pb2.OK), uri=uri, digest_function=request.digest_function,
            qualifiers=[ra_pb2.Qualifier(name=n, value=v) for n, v in record.qualifiers],
        )
        if record.expire_at is not None:
            response.expires_at.FromNanoseconds(int(record.expire_at * 1e9))
        target = response.blob_digest if kind is AssetKind.BLOB else response.root_directory_digest
        target.CopyFrom(re_pb2.Digest(hash=record.digest.hash, size_bytes=record.digest.size))
        return response

    def _miss(self, instance: Instance, context, kind: AssetKind, exc: CasbahError, uri: str):
        mode = _settings(instance).miss
        if mode == "rpc-error" or (mode == "auto" and _wants_rpc_miss(context, uri)):
            raise exc
        return _response(kind)(status=status_pb2.Status(code=code_to_int(status_code(exc)), message=str(exc)), uri=uri)

    @rpc
    async def FetchBlob(self, request, context):
        return await self._fetch(request, context, AssetKind.BLOB)

    @rpc
    async def FetchDirectory(self, request, context):
        return await self._fetch(request, context, AssetKind.DIRECTORY)


def _response(kind: AssetKind) -> type:
    return ra_pb2.FetchBlobResponse if kind is AssetKind.BLOB else ra_pb2.FetchDirectoryResponse


class PushService(ra_grpc.PushServicer):
    def __init__(self, instances: Instances, trees: CompleteTrees) -> None:
        self.instances = instances
        self.trees = trees

    async def _push(self, request, context, kind: AssetKind, root_message) -> None:
        instance = self.instances.get(request.instance_name, "asset", context, authorize=False)
        uris, qualifiers = validate(request.uris, request.qualifiers)
        self.instances.get(request.instance_name, "asset", context, write=True,
                           what=f"Push{kind.value.capitalize()}",
                           detail=f"{uris[0]} -> {root_message.hash}/{root_message.size_bytes}")
        instance.check_writable(f"Push{kind.value.capitalize()}")
        function = instance.digest_function(request.digest_function, root_message.hash)

        def digest(message) -> Digest:
            return make_digest(message.hash, message.size_bytes, function)

        root = digest(root_message)
        blobs = [digest(d) for d in request.references_blobs]
        directories = [digest(d) for d in request.references_directories]
        # The content must be in CAS before it is named (REAPI): FAILED_PRECONDITION,
        # the code for "the system is not in the state this call needs", naming what is missing.
        # A "Directory" that does not parse is the client's error: INVALID_ARGUMENT.
        missing = await missing_content(instance, self.trees, kind, root, blobs, directories)
        if missing:
            raise FailedPrecondition(
                f"cannot push {uris[0]}: {len(missing)} blob(s) it names are not in CAS, e.g. {missing[0]}; "
                "upload the content first"
            )
        record = AssetRecord(
            kind=kind, uris=tuple(uris), qualifiers=tuple(sorted(qualifiers.items())), digest=root,
            references_blobs=tuple(blobs), references_directories=tuple(directories), pushed_at=time.time(),
            expire_at=_timestamp_seconds(request.expire_at),
        )
        await _settings(instance).index.put(record)
        log.info("pushed %s asset %s -> %s", kind.value, uris[0], root)

    @rpc
    async def PushBlob(self, request, context):
        await self._push(request, context, AssetKind.BLOB, request.blob_digest)
        return ra_pb2.PushBlobResponse()

    @rpc
    async def PushDirectory(self, request, context):
        await self._push(request, context, AssetKind.DIRECTORY, request.root_directory_digest)
        return ra_pb2.PushDirectoryResponse()
