"""Asset index that forwards to an upstream's Remote Asset service.

A proxy instance answers Fetch and Push like its upstream: a lookup is one
FetchBlob/FetchDirectory upstream (the upstream applies its own matching and
completeness rules) and a push is one PushBlob/PushDirectory, both through the
one REAPI client (`casbah.reapi.cas`).  An upstream without Remote Asset
(UNIMPLEMENTED) is a plain miss, and pushes fail clearly.
"""

from __future__ import annotations

import logging

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.digest import Digest, DigestFunction
from casbah.errors import NotFound, Unsupported
from casbah.reapi.cas import CasClient
from casbah.reapi.connection import AsyncRemote
from casbah.storage.remote import RemoteConnectionOptions, remote_from_options

log = logging.getLogger(__name__)


class RemoteAssetIndex(AssetIndex):
    def __init__(self, remote: AsyncRemote) -> None:
        self.remote = remote
        self.client = CasClient(remote)

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        if offset:
            return []  # the upstream answers with its one best match
        fn = DigestFunction(function)
        try:
            if kind is AssetKind.BLOB:
                response = await self.client.fetch_blob(uris, qualifiers, fn, failed_is_miss=True)
                digest = response.blob_digest
            else:
                response = await self.client.fetch_directory(uris, qualifiers, fn, failed_is_miss=True)
                digest = response.root_directory_digest
        except (Unsupported, NotFound):
            # No Remote Asset upstream, or a miss (any failed status in the response, or an
            # RPC error with `asset-miss: rpc-error`): a miss here too, so an origin fetch may still run.
            return []
        expire = response.expires_at.ToNanoseconds() / 1e9 if response.HasField("expires_at") else None
        known = tuple(sorted((q.name, q.value) for q in response.qualifiers))
        return [AssetRecord(
            kind=kind, uris=(response.uri or uris[0],), qualifiers=known or tuple(sorted(qualifiers.items())),
            digest=Digest(digest.hash, digest.size_bytes, fn), pushed_at=float("inf"), expire_at=expire,
        )]

    async def put(self, record: AssetRecord) -> None:
        push = self.client.push_blob if record.kind is AssetKind.BLOB else self.client.push_directory
        await push(list(record.uris), record.digest, record.qualifiers, record.expire_at,
                   record.references_blobs, record.references_directories)

    async def purge_expired(self, now: float) -> int:
        """Nothing to do here: the upstream purges its own index."""
        return 0

    async def close(self) -> None:
        await self.client.close()


@ASSET_INDEX.register("remote", RemoteConnectionOptions)
def _build(options: RemoteConnectionOptions, context: IndexContext) -> AssetIndex:
    return RemoteAssetIndex(remote_from_options(options, context.path))
