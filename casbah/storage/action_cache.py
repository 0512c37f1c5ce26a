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


class RemoteActionCache(ActionCache):
    """Forwards to an upstream's ActionCache (a proxy instance behaves like its upstream)."""

    def __init__(self, remote) -> None:
        self.remote = remote

    async def get(self, action: Digest) -> bytes | None:
        from casbah.errors import NotFound
        from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        stubs = self.remote.stubs()
        request = re_pb2.GetActionResultRequest(
            instance_name=self.remote.instance, digest_function=action.function.proto_value,
            action_digest=re_pb2.Digest(hash=action.hash, size_bytes=action.size),
        )
        try:
            result = await self.remote.unary(stubs.action_cache.GetActionResult, request, "GetActionResult")
        except NotFound:
            return None
        return result.SerializeToString(deterministic=True)

    async def put(self, action: Digest, result: bytes) -> None:
        from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        stubs = self.remote.stubs()
        request = re_pb2.UpdateActionResultRequest(
            instance_name=self.remote.instance, digest_function=action.function.proto_value,
            action_digest=re_pb2.Digest(hash=action.hash, size_bytes=action.size),
            action_result=re_pb2.ActionResult.FromString(result),
        )
        await self.remote.unary(stubs.action_cache.UpdateActionResult, request, "UpdateActionResult")

    async def close(self) -> None:
        await self.remote.close()
