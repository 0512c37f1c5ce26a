"""Asset index interface and the matching rule every backend implements.

An asset is what one Push stored: a blob or a directory digest, every URI the
push named (each an alias of the same content), the complete qualifier set the
pusher knew, content to keep alive with it, and its push and expiry times.

Matching (the REAPI text: clients push "the complete qualifier set they know" and
fetch with "the minimal set that identifies the content"): a fetch matches an
asset when one of the fetch's URIs is one of the asset's URIs and every fetch
qualifier is among the asset's qualifiers with the same value.  Qualifier order
never matters.  Among matches the most recently pushed one wins (push order as
the index saw the `put` calls; a re-push of the same names counts as new); the
service then skips candidates whose content is no longer complete in CAS.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from casbah.digest import Digest
from casbah.metered import Meter
from casbah.registry import Registry


class AssetKind(StrEnum):
    BLOB = "blob"
    DIRECTORY = "directory"


@dataclass(frozen=True)
class AssetRecord:
    kind: AssetKind
    uris: tuple[str, ...]
    qualifiers: tuple[tuple[str, str], ...]  # sorted by name
    digest: Digest
    references_blobs: tuple[Digest, ...] = ()
    references_directories: tuple[Digest, ...] = ()
    pushed_at: float = 0.0
    expire_at: float | None = None  # seconds since the epoch; None = never
    key: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", asset_key(self.kind, self.uris, self.qualifiers, self.digest.function))

    def matches(self, uris: set[str], qualifiers: dict[str, str]) -> bool:
        if not uris.intersection(self.uris):
            return False
        mine = dict(self.qualifiers)
        return all(mine.get(name) == value for name, value in qualifiers.items())

    def expired(self, now: float) -> bool:
        return self.expire_at is not None and self.expire_at <= now


def asset_key(kind: AssetKind, uris: tuple[str, ...], qualifiers: tuple[tuple[str, str], ...], fn: object) -> str:
    """Identity of a push: a repeated push of the same names replaces the earlier one."""
    blob = json.dumps([kind, sorted(set(uris)), sorted(qualifiers), str(fn)], separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


class AssetIndex(abc.ABC):
    """Backends: memory, SQLite (persistent, the disk default), Redis, PostgreSQL, remote.

    `candidates` is a query, so a miss is an empty list (not an error): the
    services page through it and turn "nothing complete" into their NotFound.
    """

    @abc.abstractmethod
    async def put(self, record: AssetRecord) -> None:
        """Store a record, replacing one with the same key."""

    @abc.abstractmethod
    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        """Records matching the rule above, most recently pushed first (expiry not applied).

        `limit`/`offset` page through them: a fetch usually needs only the first,
        and a URI may have thousands of qualifier variants that a fetch with few
        qualifiers all matches.
        """

    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete records whose `expire_at` is at or before `now`; returns how many went.

        Lookups already skip expired records; purging keeps the index from growing
        with pushes nobody can fetch any more.  The server calls it in the background.
        """

    async def close(self) -> None:
        pass


@dataclass(frozen=True)
class IndexContext:
    """What an asset-index builder needs besides its options: the index is per instance."""

    instance: str
    data_dir: Path
    path: str


#: Builders are called as `(options, context: IndexContext) -> AssetIndex`.
ASSET_INDEX: Registry[AssetIndex] = Registry(
    "asset-index", [f"casbah.assets.{m}" for m in ("memory", "postgres", "redis", "remote", "sqlite")]
)


class MetricsAssetIndex(AssetIndex):
    """The wrapper the loader puts around every asset index; `inner` is the real backend."""

    def __init__(self, inner: AssetIndex, node_path: str, kind: str) -> None:
        self.inner = inner
        self.kind = kind
        self.node_path = node_path
        self._meter = Meter("asset_index", node_path, ("put", "candidates"))

    async def put(self, record: AssetRecord) -> None:
        await self._meter.measure("put", self.inner.put(record))

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        return await self._meter.measure(
            "candidates", self.inner.candidates(kind, uris, qualifiers, function, limit, offset), empty_is_miss=True)

    async def purge_expired(self, now: float) -> int:
        return await self.inner.purge_expired(now)

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def build_asset_index(node: str | dict[str, Any], context: IndexContext) -> MetricsAssetIndex:
    """An instance's `asset-index:`: a mapping with a kind, or just the kind's name."""
    ASSET_INDEX.load_builtin()
    spec = {"kind": node} if isinstance(node, str) else node
    kind, options = ASSET_INDEX.parse(spec, context.path)
    return MetricsAssetIndex(kind.build(options, context), context.path, kind.name)
