"""ActionCache backends: action digest -> serialized ActionResult, and the family's loader.

The default keeps entries in a storage node with verification off (an entry is
keyed by the action's digest, not by the hash of its bytes), so the ActionCache
gets the same backends, quota and metrics as CAS.  The kinds of this family
(`remote` here, `redis` and `postgres` in ac_shared.py) register with
`ACTION_CACHE` like storage kinds do; any other node under an instance's
`action-cache:` is a storage node.  `get` raises `ActionResultNotFound` on a
miss, as storage raises `BlobNotFound`: only the servicer turns it into a
response.
"""

from __future__ import annotations

import abc
from typing import Any

from casbah.config import ConfigError
from casbah.digest import Digest
from casbah.errors import ActionResultNotFound, BlobNotFound, NotFound
from casbah.metered import Meter
from casbah.registry import LazyKind, Registry
from casbah.storage.base import Storage
from casbah.storage.loader import STORAGE, StorageLoader
from casbah.storage.remote import RemoteConnectionOptions, remote_from_options


class ActionCache(abc.ABC):
    @abc.abstractmethod
    async def get(self, action: Digest) -> bytes:
        """The serialized ActionResult; `ActionResultNotFound` when there is none."""

    @abc.abstractmethod
    async def put(self, action: Digest, result: bytes) -> None:
        """Store (or overwrite) an entry."""

    async def close(self) -> None:
        pass


#: Builders are called as `(options, path) -> ActionCache`.
ACTION_CACHE: Registry[ActionCache] = Registry(
    "ActionCache",
    ["casbah.storage.action_cache"],
    lazy={
        "redis": LazyKind("casbah.storage.ac_shared", "redis", ("redis",)),
        "postgres": LazyKind("casbah.storage.ac_shared", "postgres", ("psycopg", "psycopg_pool")),
    },
)


class StorageActionCache(ActionCache):
    def __init__(self, storage: Storage) -> None:
        if storage.verify:
            raise ValueError(
                f"storage {storage.name!r} verifies hashes; an ActionCache store needs 'verify: false'"
            )
        self.storage = storage

    async def get(self, action: Digest) -> bytes:
        try:
            return await self.storage.read_bytes(action)
        except BlobNotFound:
            raise ActionResultNotFound(action) from None

    async def put(self, action: Digest, result: bytes) -> None:
        await self.storage.write_bytes(action, result)

    async def close(self) -> None:
        await self.storage.close()


class RemoteActionCache(ActionCache):
    """Forwards to an upstream's ActionCache (a proxy instance behaves like its upstream)."""

    def __init__(self, remote) -> None:
        self.remote = remote

    async def get(self, action: Digest) -> bytes:
        from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

        stubs = self.remote.stubs()
        request = re_pb2.GetActionResultRequest(
            instance_name=self.remote.instance, digest_function=action.function.proto_value,
            action_digest=re_pb2.Digest(hash=action.hash, size_bytes=action.size),
        )
        try:
            result = await self.remote.unary(stubs.action_cache.GetActionResult, request, "GetActionResult")
        except NotFound as exc:
            raise ActionResultNotFound(action, f"upstream: {exc}") from None
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


@ACTION_CACHE.register("remote", RemoteConnectionOptions)
def _remote(options: RemoteConnectionOptions, path: str) -> ActionCache:
    return RemoteActionCache(remote_from_options(options, path))


class MetricsActionCache(ActionCache):
    """The wrapper the loader puts around every ActionCache; `inner` is the real backend."""

    def __init__(self, inner: ActionCache, node_path: str, kind: str) -> None:
        self.inner = inner
        self.kind = kind
        self.node_path = node_path
        self._meter = Meter("action_cache", node_path, ("get", "put"))

    async def get(self, action: Digest) -> bytes:
        return await self._meter.measure("get", self.inner.get(action))

    async def put(self, action: Digest, result: bytes) -> None:
        await self._meter.measure("put", self.inner.put(action, result))

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build_action_cache(storage: StorageLoader, node: str | dict[str, Any], path: str) -> MetricsActionCache:
    """An instance's `action-cache:`: a kind of this family, or else a storage node (named or
    inline, `verify: false`) holding serialized ActionResults.  A named storage node of kind
    `remote` forwards to the upstream's ActionCache: ActionResults are never stored in an
    upstream's CAS under the action digest."""
    STORAGE.load_builtin()
    ACTION_CACHE.load_builtin()
    kind_name = node.get("kind") if isinstance(node, dict) else storage.named_kind(node)
    inner: ActionCache
    if isinstance(node, str) and kind_name == "remote":
        where = f"storages.{node}"
        _, options = STORAGE.parse(storage.named_node(node), where)
        inner = ACTION_CACHE.kinds["remote"].build(options, where)
    elif isinstance(node, dict) and ACTION_CACHE.has(kind_name):
        kind, options = ACTION_CACHE.parse(node, path)
        inner = kind.build(options, path)
    else:
        if isinstance(node, dict) and kind_name is not None and not STORAGE.has(kind_name):
            raise ConfigError(f"{path}.kind: unknown ActionCache kind {kind_name!r}; known: "
                              f"{', '.join(ACTION_CACHE.known())}, or any storage kind "
                              f"({', '.join(STORAGE.known())}) with 'verify: false'")
        try:
            inner = StorageActionCache(storage.build(node, path))
        except ValueError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        kind_name = f"storage ({kind_name})" if kind_name else "storage"
    return MetricsActionCache(inner, path, str(kind_name))
