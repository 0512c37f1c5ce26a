"""Builds storage graphs from config nodes.

Each backend module registers a kind with an options model; a node is either a
mapping (`kind` + options) or the name of a node under `storages:`.  Named nodes
are built once and shared.  Every node the loader builds is wrapped in
`MetricsStorage`, so no backend counts its own requests.
"""

from __future__ import annotations

from typing import Any

from casbah.config import ConfigError
from casbah.registry import Kind, KindOptions, LazyKind, Registry
from casbah.storage.base import Storage


class NodeOptions(KindOptions):
    """Base of every storage kind's options model: unknown keys are errors."""

    verify: bool = True


#: Builders are called as `(options, loader, path) -> Storage`.
STORAGE: Registry[Storage] = Registry(
    "storage",
    [
        f"casbah.storage.{m}" for m in (
            "disk", "existence_cache", "memory", "read_through", "remote", "replicated", "sharded", "size_routed",
        )
    ],
    lazy={
        "s3": LazyKind("casbah.storage.s3", "s3", ("boto3",)),
        "redis": LazyKind("casbah.storage.redis_store", "redis", ("redis",)),
        "blob-index": LazyKind("casbah.storage.blob_index", "postgres", ("psycopg", "psycopg_pool")),
    },
)
KINDS: dict[str, Kind[Storage]] = STORAGE.kinds
register = STORAGE.register


class StorageLoader:
    def __init__(self, named: dict[str, dict[str, Any]], maintenance: bool = False,
                 shared_directories: bool = False) -> None:
        """`maintenance`: opened by an admin command beside a live server.
        `shared_directories`: several server processes build this same graph and serve
        its directories at once (`serve --workers N`), so backends that keep a
        per-process index (disk) must keep it in step with the others'."""
        self._named = named
        self.maintenance = maintenance
        self.shared_directories = shared_directories
        self._built: dict[str, Storage] = {}
        self._building: set[str] = set()
        #: Every node built, named or inline, so the server can close them all.
        self._every: list[Storage] = []

    def build(self, node: str | dict[str, Any], path: str) -> Storage:
        if isinstance(node, str):
            return self._build_named(node, path)
        if not isinstance(node, dict) or "kind" not in node:
            raise ConfigError(f"{path}: a storage node needs a 'kind' (or the name of a node in 'storages')")
        kind, options = STORAGE.parse(node, path)
        from casbah.storage.metrics import MetricsStorage

        built = MetricsStorage(kind.build(options, self, path), node_path=path)
        self._every.append(built)
        return built

    def _build_named(self, name: str, path: str) -> Storage:
        if name in self._built:
            return self._built[name]
        if name not in self._named:
            raise ConfigError(f"{path}: no storage named {name!r} (defined: {', '.join(sorted(self._named))})")
        if name in self._building:
            raise ConfigError(f"{path}: storage {name!r} refers to itself")
        self._building.add(name)
        storage = self.build(self._named[name], f"storages.{name}")
        self._building.discard(name)
        storage.name = name
        self._built[name] = storage
        return storage

    def named_node(self, name: str) -> dict[str, Any]:
        return self._named[name]

    def named_kind(self, name: str) -> str | None:
        node = self._named.get(name)
        return node.get("kind") if isinstance(node, dict) else None

    def all(self) -> list[Storage]:
        """Every node built, parents before children (closing is idempotent)."""
        return list(reversed(self._every))


def load_builtin_kinds() -> None:
    """Import every backend module so it registers its kind."""
    STORAGE.load_builtin()
