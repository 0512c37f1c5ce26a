"""Asset index that forwards to an upstream's Remote Asset service.

A proxy instance answers Fetch and Push like its upstream: a lookup is one
FetchBlob/FetchDirectory upstream (the upstream applies its own matching and
completeness rules) and a push is one PushBlob/PushDirectory.  An upstream
without Remote Asset (UNIMPLEMENTED) is a plain miss, and pushes fail clearly.
"""

from __future__ import annotations

import logging

from google.rpc import code_pb2

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.digest import Digest, DigestFunction
from casbah.errors import NotFound, Unsupported
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.storage.remote import RemoteConnectionOptions, remote_from_options

log = logging.getLogger(__name__)


class RemoteAssetIndex(AssetIndex):
    def __init__(self, remote) -> None:
        self.remote = remote

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        if offset:
            return []  # the upstream answers with its one best match
        stubs = self.remote.stubs()
        fn = DigestFunction(function)
        common = {
            "instance_name": self.remote.instance, "uris": uris, "digest_function": fn.proto_value,
            "qualifiers": [ra_pb2.Qualifier(name=n, value=v) for n, v in qualifiers.items()],
        }
        try:
            if kind is AssetKind.BLOB:
                response = await self.remote.unary(stubs.fetch.FetchBlob, ra_pb2.FetchBlobRequest(**common),
                                                   "FetchBlob")
                digest = response.blob_digest
            else:
                response = await self.remote.unary(
                    stubs.fetch.FetchDirectory, ra_pb2.FetchDirectoryRequest(**common), "FetchDirectory"
                )
                digest = response.root_directory_digest
        except (Unsupported, NotFound):
            # No Remote Asset upstream, or one that answers a miss as an RPC error
            # (`asset-miss: rpc-error`): a miss here too, so an origin fetch may still run.
            return []
        if response.status.code != code_pb2.OK:
            return []
        expire = response.expires_at.ToNanoseconds() / 1e9 if response.HasField("expires_at") else None
        known = tuple(sorted((q.name, q.value) for q in response.qualifiers))
        return [AssetRecord(
            kind=kind, uris=(response.uri or uris[0],), qualifiers=known or tuple(sorted(qualifiers.items())),
            digest=Digest(digest.hash, digest.size_bytes, fn), pushed_at=float("inf"), expire_at=expire,
        )]

    async def put(self, record: AssetRecord) -> None:
        stubs = self.remote.stubs()

        def proto(d: Digest) -> re_pb2.Digest:
            return re_pb2.Digest(hash=d.hash, size_bytes=d.size)

        common = {
            "instance_name": self.remote.instance, "uris": list(record.uris),
            "qualifiers": [ra_pb2.Qualifier(name=n, value=v) for n, v in record.qualifiers],
            "references_blobs": [proto(d) for d in record.references_blobs],
            "references_directories": [proto(d) for d in record.references_directories],
            "digest_function": record.digest.function.proto_value,
        }
        if record.kind is AssetKind.BLOB:
            request = ra_pb2.PushBlobRequest(blob_digest=proto(record.digest), **common)
            method = stubs.push.PushBlob
        else:
            request = ra_pb2.PushDirectoryRequest(root_directory_digest=proto(record.digest), **common)
            method = stubs.push.PushDirectory
        if record.expire_at is not None:
            request.expire_at.FromNanoseconds(int(record.expire_at * 1e9))
        await self.remote.unary(method, request, f"Push{record.kind.value.capitalize()}")

    async def purge_expired(self, now: float) -> int:
        """Nothing to do here: the upstream purges its own index."""
        return 0

    async def close(self) -> None:
        await self.remote.close()


@ASSET_INDEX.register("remote", RemoteConnectionOptions)
def _build(options: RemoteConnectionOptions, context: IndexContext) -> AssetIndex:
    return RemoteAssetIndex(remote_from_options(options, context.path))
