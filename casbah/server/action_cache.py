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
from casbah.errors import BlobNotFound, DataLoss, InvalidArgument, InvalidTree, NotFound
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.server.base import Instance, Instances, rpc
from casbah.storage.base import Storage, read_many_partial
from casbah.tree import check_tree_message, walk_levels
from casbah.tree_rules import echo, output_path_problem

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
        action = instance.digest(request.action_digest, request.digest_function)
        function = action.function
        data = await instance.action_cache.get(action)  # a miss raises ActionResultNotFound: NOT_FOUND
        result = await checked_action_result(instance, data, action, function)
        try:
            await _inline(instance.cas, result, request, function)
        except InvalidArgument as exc:
            # The stored entry names a blob it cannot inline (a malformed digest): a miss.
            log.warning("ActionCache entry for %s is unusable (%s); reporting a miss", action, exc)
            raise NotFound(f"ActionResult for action {action} is unusable: {exc}") from None
        return result

    @rpc
    async def UpdateActionResult(self, request, context):
        d = request.action_digest
        instance = self._instance(request.instance_name, context, "UpdateActionResult", write=True,
                                  detail=f"action {d.hash}/{d.size_bytes}")
        instance.check_writable("UpdateActionResult")
        action = instance.digest(request.action_digest, request.digest_function)
        function = action.function
        _referenced(request.action_result, function)  # refuse malformed digests now, not at every Get
        await check_output_trees(instance.cas, request.action_result, function)
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
        # Tree, a tree breaking the REAPI's name rules), not the request: a miss
        # lets the client rebuild and overwrite it.
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
    """Every blob an ActionResult needs that CAS lacks (empty if complete).

    Output trees are read anyway, so they are checked against the REAPI's name
    rules on the way (InvalidTree): an entry with a bad tree is unusable.
    """
    blobs, trees, roots = _referenced(result, function)
    wanted = {d for d in (*blobs, *trees) if not is_empty_blob(d)}
    missing = list(await cas.find_missing(list(wanted))) if wanted else []
    if missing:
        return missing
    files: set[Digest] = set()
    absent = await _read_output_trees(cas, trees, roots, function, files)
    if absent:
        return absent
    return list(await cas.find_missing(list(files))) if files else []


async def check_output_trees(cas: Storage, result, function: DigestFunction) -> None:
    """Refuse an ActionResult whose outputs break the REAPI's path and name rules.

    Output paths must stay inside the working directory; every output tree that is
    already in CAS (a `Tree`, or a 2.3 root Directory and its DAG) must keep the
    Directory rules.  A tree not uploaded yet is accepted: the entry is a miss until
    it arrives, and GetActionResult checks it then (`missing_outputs`).
    """
    for kind, entries, allow_empty in (("output file", result.output_files, False),
                                       ("output symlink", result.output_symlinks, False),
                                       ("output file symlink", result.output_file_symlinks, False),
                                       ("output directory symlink", result.output_directory_symlinks, False),
                                       ("output directory", result.output_directories, True)):
        for entry in entries:
            if (problem := output_path_problem(entry.path, allow_empty)) is not None:
                raise InvalidTree(f"{kind} {echo(entry.path)}: {problem}")
    _, trees, _ = _referenced(result, function)
    # Every root Directory, also those next to a Tree: a client may materialise either.
    roots = [d for od in result.output_directories if (d := _d(od.root_directory_digest, function)) is not None]
    await _read_output_trees(cas, trees, roots, function, set())


async def _read_output_trees(cas: Storage, trees: list[Digest], roots: list[Digest], function: DigestFunction,
                             files: set[Digest]) -> list[Digest]:
    """Read and check output Trees and root Directory DAGs, collecting their files; return what is absent."""
    absent: list[Digest] = []
    for tree_digest in trees:
        if is_empty_blob(tree_digest):
            continue
        try:
            tree = re_pb2.Tree.FromString(await cas.read_bytes(tree_digest))
        except BlobNotFound:
            absent.append(tree_digest)
            continue
        except DecodeError:
            raise InvalidTree(f"output tree {tree_digest} is not a Tree message") from None
        check_tree_message(tree, tree_digest)
        for directory in (tree.root, *tree.children):
            _collect_files(directory, function, files)
    if roots:
        async def read_many(digests: list[Digest]) -> dict[Digest, bytes]:
            # A lost (corrupt) directory counts as absent: the entry is a miss, the client re-uploads.
            return (await read_many_partial(cas, digests))[0]

        async for visits in walk_levels(read_many, [(d, "") for d in roots]):
            for visit in visits:
                if visit.directory is None:
                    absent.append(visit.digest)
                else:
                    _collect_files(visit.directory, function, files)
    return absent


def _collect_files(directory, function: DigestFunction, files: set[Digest]) -> None:
    for node in directory.files:
        if (d := _d(node.digest, function)) is not None and not is_empty_blob(d):
            files.add(d)


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
