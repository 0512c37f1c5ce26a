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

from casbah.digest import Digest


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
    """Backends: memory, SQLite (persistent, the disk default); Redis/PostgreSQL later."""

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

    async def close(self) -> None:
        pass
