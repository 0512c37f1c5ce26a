"""ActionCache backends: action digest -> serialized ActionResult.

The default keeps entries in a storage node with verification off (an entry is
keyed by the action's digest, not by the hash of its bytes), so the ActionCache
gets the same backends, quota and metrics as CAS.  Later backends (remote,
Redis, PostgreSQL) implement the same two methods.
"""

from __future__ import annotations

import abc

from casbah.digest import Digest
from casbah.errors import BlobNotFound
from casbah.storage.base import Storage


class ActionCache(abc.ABC):
    @abc.abstractmethod
    async def get(self, action: Digest) -> bytes | None:
        """The serialized ActionResult, or None."""

    @abc.abstractmethod
    async def put(self, action: Digest, result: bytes) -> None:
        """Store (or overwrite) an entry."""

    async def close(self) -> None:
        pass


class StorageActionCache(ActionCache):
    def __init__(self, storage: Storage) -> None:
        if storage.verify:
            raise ValueError(
                f"storage {storage.name!r} verifies hashes; an ActionCache store needs 'verify: false'"
            )
        self.storage = storage

    async def get(self, action: Digest) -> bytes | None:
        try:
            return await self.storage.read_bytes(action)
        except BlobNotFound:
            return None

    async def put(self, action: Digest, result: bytes) -> None:
        await self.storage.write_bytes(action, result)

    async def close(self) -> None:
        await self.storage.close()
