"""The opaque key -> value namespace of the HTTP front (ccache, sccache, non-ActionResult `/ac/`).

Compiler caches store their own result files under names they choose.  These are not
content-addressed and not ActionResults, so they live in a storage node of their own
with `verify: false` (as the ActionCache's entries do): the same backends, quota,
LRU eviction and storage metrics as everything else, but a separate node, so no REAPI
call can ever reach them.  A gRPC GetActionResult reads only the ActionCache's node;
an HTTP `/ac/` entry that is not an ActionResult is written here and nowhere else.

Keys are per instance. A key is a path-like string (`ac/<64 hex>`, `ab/cdef…`, `a/b/c/<key>`).  Storage wants a
`Digest`; the key's storage name is the SHA-256 of a tag and the key, with size 0 —
nodes with `verify: false` neither check the hash nor the size, and this keeps each
key at one fixed storage name whatever the length of its value.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator

from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, NotFound
from casbah.storage.base import Storage

_TAG = b"casbah-http-opaque\0"


class EntryNotFound(NotFound):
    """No opaque entry under this key (the HTTP front answers 404)."""


class OpaqueStore:
    """Values by key, streamed in and out of a `verify: false` storage node."""

    def __init__(self, storage: Storage, namespace: str = "") -> None:
        if storage.verify:
            raise ValueError(f"storage {storage.name!r} verifies hashes; the opaque HTTP namespace needs "
                             "'verify: false'")
        self.storage = storage
        #: The instance name: instances sharing a node do not see each other's keys.
        self.namespace = namespace

    def name_of(self, key: str) -> Digest:
        """The storage name of a key: stable, and unlike any content digest a client can send
        to this node (the node is reachable only from here)."""
        name = _TAG + self.namespace.encode() + b"\0" + key.encode()
        return Digest(hashlib.sha256(name).hexdigest(), 0, DigestFunction.SHA256)

    async def has(self, key: str) -> bool:
        return not await self.storage.find_missing([self.name_of(key)])

    async def open(self, key: str) -> AsyncIterator[bytes]:
        """The value's chunks; raises `EntryNotFound` before any data."""
        try:
            return await self.storage.read(self.name_of(key))
        except BlobNotFound:
            raise EntryNotFound(f"no entry {key!r}") from None

    async def get(self, key: str) -> bytes:
        return b"".join([chunk async for chunk in await self.open(key)])

    async def put(self, key: str, chunks: AsyncIterable[bytes]) -> None:
        await self.storage.write(self.name_of(key), chunks)

    async def put_bytes(self, key: str, data: bytes) -> None:
        await self.storage.write_bytes(self.name_of(key), data)

    async def delete(self, key: str) -> bool:
        return bool(await self.storage.delete([self.name_of(key)]))
