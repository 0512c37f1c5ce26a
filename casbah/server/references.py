"""BuildStream's `buildstream.v2.ReferenceStorage`: artifact refs for BuildStream 1.x.

A reference is kept in the asset index as a directory asset named
`urn:fdc:buildstream.build:2020:v1:<key>`, the URI BuildStream 1.6 itself uses in
its Remote Asset mode, so a cache written in one mode is readable in the other.
"""

from __future__ import annotations

import time

from casbah.assets.index import AssetKind, AssetRecord
from casbah.digest import DigestFunction, make_digest
from casbah.errors import FailedPrecondition, InvalidArgument, NotFound, echo
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.server.asset import CANDIDATE_PAGE, _settings
from casbah.server.base import Instances, rpc
from casbah.tree import CompleteTrees

URI_PREFIX = "urn:fdc:buildstream.build:2020:v1:"


class ReferenceStorageService(bst_grpc.ReferenceStorageServicer):
    def __init__(self, instances: Instances, trees: CompleteTrees) -> None:
        self.instances = instances
        self.trees = trees

    @rpc
    async def GetReference(self, request, context):
        instance = self.instances.get(request.instance_name, "references", context, what="GetReference")
        if not request.key:
            raise InvalidArgument("empty reference key")
        index = _settings(instance).index
        now = time.time()
        offset = 0
        while True:
            page = await index.candidates(AssetKind.DIRECTORY, [URI_PREFIX + request.key], {},
                                          DigestFunction.SHA256, limit=CANDIDATE_PAGE, offset=offset)
            for record in page:
                if record.expired(now):
                    continue
                try:
                    incomplete = await self.trees.missing(instance.cas, record.digest)
                except InvalidArgument:  # a stored "Directory" that does not parse: unusable, skip it
                    continue
                if not incomplete:
                    return bst_pb2.GetReferenceResponse(
                        digest=re_pb2.Digest(hash=record.digest.hash, size_bytes=record.digest.size)
                    )
            if len(page) < CANDIDATE_PAGE:
                break
            offset += CANDIDATE_PAGE
        raise NotFound(f"reference {echo(request.key)} not found (or its tree is no longer complete)")

    @rpc
    async def UpdateReference(self, request, context):
        d = request.digest
        instance = self.instances.get(request.instance_name, "references", context, write=True,
                                      what="UpdateReference", detail=f"{list(request.keys)} -> {d.hash}/{d.size_bytes}")
        instance.check_writable("UpdateReference")
        if not request.keys or any(not k for k in request.keys):
            raise InvalidArgument("UpdateReference needs non-empty keys")
        digest = make_digest(request.digest.hash, request.digest.size_bytes, DigestFunction.SHA256)
        missing = await self.trees.missing(instance.cas, digest)
        if missing:
            raise FailedPrecondition(f"tree {digest} is incomplete in CAS ({len(missing)} blobs missing)")
        record = AssetRecord(
            AssetKind.DIRECTORY, tuple(URI_PREFIX + k for k in request.keys), (), digest, pushed_at=time.time()
        )
        await _settings(instance).index.put(record)
        return bst_pb2.UpdateReferenceResponse()

    @rpc
    async def Status(self, request, context):
        instance = self.instances.get(request.instance_name, "references", context, what="Status")
        return bst_pb2.StatusResponse(allow_updates=not instance.read_only)
