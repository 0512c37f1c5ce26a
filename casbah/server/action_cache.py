"""ActionCache: GetActionResult / UpdateActionResult.

With `check-action-results` (the default) an entry is served only if everything it
names is still in CAS: output files, stdout/stderr, and every file of every output
directory's Tree.  Bazel's `--remote_download_minimal` trusts a hit to mean the
outputs can be fetched later; a hit with evicted outputs fails the build then.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from casbah.digest import Digest, DigestFunction, is_empty_blob, make_digest
from casbah.errors import BlobNotFound, DataLoss, InvalidArgument, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.server.base import Instance, Instances, rpc
from casbah.storage.base import Storage, read_many_partial

log = logging.getLogger(__name__)

#: Inline stdout/stderr/output files up to this size when the client asks.
INLINE_LIMIT = 64 * 1024


class ActionCacheService(re_grpc.ActionCacheServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances

    def _instance(self, name: str, context, what: str, write: bool = False, detail: str = "") -> Instance:
        return self.instances.get(name, "action-cache", context, write=write, what=what, detail=detail)

    @rpc
    async def GetActionResult(self, request, context):
        instance = self._instance(request.instance_name, context, "GetActionResult")
        function = DigestFunction.from_proto(request.digest_function)
        action = make_digest(request.action_digest.hash, request.action_digest.size_bytes, function)
        data = await instance.action_cache.get(action)  # a miss raises ActionResultNotFound: NOT_FOUND
        result = await checked_action_result(instance, data, action, function)
        try:
            await _inline(instance.cas, result, request, function)
        except InvalidArgument as exc:
            log.warning("ActionCache entry for %s is unusable (%s); reporting a miss", action, exc)
            raise NotFound(f"ActionResult for action {action} is unusable: {exc}") from None
        return result

    @rpc
    async def UpdateActionResult(self, request, context):
        d = request.action_digest
        instance = self._instance(request.instance_name, context, "UpdateActionResult", write=True,
                                  detail=f"action {d.hash}/{d.size_bytes}")
        instance.check_writable("UpdateActionResult")
        function = DigestFunction.from_proto(request.digest_function)
        action = make_digest(request.action_digest.hash, request.action_digest.size_bytes, function)
        _referenced(request.action_result, function)  # refuse malformed digests now, not at every Get
        await instance.action_cache.put(action, request.action_result.SerializeToString(deterministic=True))
        return request.action_result


async def checked_action_result(instance: Instance, data: bytes, action: Digest,
                                function: DigestFunction) -> re_pb2.ActionResult:
    """A stored entry as an ActionResult fit to serve, else `NotFound` (a miss).

    Every front serves ActionCache entries through this (gRPC GetActionResult, the HTTP
    `/ac/`): a corrupt entry, or one naming blobs no longer in CAS (with
    `check-action-results`, the default), is reported as a miss so the client rebuilds.
    """
    result = re_pb2.ActionResult()
    try:
        result.ParseFromString(data)
    except DecodeError:
        log.warning("ActionCache entry for %s is corrupt; reporting a miss", action)
        raise NotFound(f"ActionResult for action {action} is corrupt") from None
    try:
        if instance.extras.get("check_action_results", True):
            missing = await missing_outputs(instance.cas, result, function)
            if missing:
                raise NotFound(
                    f"ActionResult for action {action} refers to {len(missing)} blob(s) no longer in CAS, "
                    f"e.g. {missing[0]}"
                )
    except InvalidArgument as exc:
        # The stored entry is bad (a malformed digest, a Tree blob that is not a
        # Tree), not the request: a miss lets the client rebuild and overwrite it.
        log.warning("ActionCache entry for %s is unusable (%s); reporting a miss", action, exc)
        raise NotFound(f"ActionResult for action {action} is unusable: {exc}") from None
    return result


def referenced_digests(result, function: DigestFunction) -> list[Digest]:
    """Every digest an ActionResult names directly (files, stdout/stderr, trees, roots);
    raises `InvalidArgument` for a malformed one."""
    blobs, trees, roots = _referenced(result, function)
    return [*blobs, *trees, *roots]


def _d(message, function: DigestFunction) -> Digest | None:
    if not message.hash:
        return None
    return make_digest(message.hash, message.size_bytes, function)


def _referenced(result, function: DigestFunction) -> tuple[set[Digest], list[Digest], list[Digest]]:
    """(blobs, output Tree digests, output root Directory digests) an ActionResult names; validates them."""
    blobs: set[Digest] = set()
    for f in result.output_files:
        if (d := _d(f.digest, function)) is not None:
            blobs.add(d)
    for message in (result.stdout_digest, result.stderr_digest):
        if (d := _d(message, function)) is not None:
            blobs.add(d)
    trees: list[Digest] = []
    roots: list[Digest] = []
    for od in result.output_directories:
        if (d := _d(od.tree_digest, function)) is not None:
            trees.append(d)
        elif (d := _d(od.root_directory_digest, function)) is not None:
            roots.append(d)  # REAPI 2.3: the directory as a Directory DAG, without a Tree
    return blobs, trees, roots


async def missing_outputs(cas: Storage, result, function: DigestFunction) -> list[Digest]:
    """Every blob an ActionResult needs that CAS lacks (empty if complete)."""
    blobs, trees, roots = _referenced(result, function)
    wanted = {d for d in (*blobs, *trees) if not is_empty_blob(d)}
    missing = await cas.find_missing(list(wanted)) if wanted else []
    if missing:
        return missing
    files: set[Digest] = set()
    for tree_digest in trees:
        if is_empty_blob(tree_digest):
            continue
        try:
            tree = re_pb2.Tree.FromString(await cas.read_bytes(tree_digest))
        except BlobNotFound:
            return [tree_digest]
        except DecodeError:
            raise InvalidArgument(f"output tree {tree_digest} is not a Tree message") from None
        for directory in (tree.root, *tree.children):
            _collect_files(directory, function, files)
    if roots:
        absent = await _walk_directories(cas, roots, function, files)
        if absent:
            return absent
    return await cas.find_missing(list(files)) if files else []


def _collect_files(directory, function: DigestFunction, files: set[Digest]) -> None:
    for node in directory.files:
        if (d := _d(node.digest, function)) is not None and not is_empty_blob(d):
            files.add(d)


async def _walk_directories(cas: Storage, roots: list[Digest], function: DigestFunction,
                            files: set[Digest]) -> list[Digest]:
    """Collect the files of Directory DAGs into `files`; return the directories that are absent."""
    level = [d for d in dict.fromkeys(roots) if not is_empty_blob(d)]
    seen = set(level)
    while level:
        found, _ = await read_many_partial(cas, level)  # a lost (corrupt) directory counts as absent
        absent = [d for d in level if d not in found]
        if absent:
            return absent
        next_level: list[Digest] = []
        for digest in level:
            try:
                directory = re_pb2.Directory.FromString(found[digest])
            except DecodeError:
                raise InvalidArgument(f"output directory {digest} is not a Directory message") from None
            _collect_files(directory, function, files)
            for node in directory.directories:
                child = make_digest(node.digest.hash, node.digest.size_bytes, function)
                if child not in seen and not is_empty_blob(child):
                    seen.add(child)
                    next_level.append(child)
        level = next_level
    return []


async def _inline(cas: Storage, result, request, function: DigestFunction) -> None:
    async def fetch(message) -> bytes | None:
        d = _d(message, function)
        if d is None or d.size > INLINE_LIMIT:
            return None
        if is_empty_blob(d):
            return b""
        try:
            return await cas.read_bytes(d)
        except (BlobNotFound, DataLoss):  # inlining is optional: the client reads it by digest
            return None

    if request.inline_stdout and not result.stdout_raw and (data := await fetch(result.stdout_digest)):
        result.stdout_raw = data
    if request.inline_stderr and not result.stderr_raw and (data := await fetch(result.stderr_digest)):
        result.stderr_raw = data
    wanted = set(request.inline_output_files)
    for f in result.output_files:
        if f.path in wanted and not f.contents and (data := await fetch(f.digest)):
            f.contents = data
