"""In-memory asset index: inverted indexes so lookups stay fast with many variants per URI.

Every (uri) and (uri, qualifier, value) pair maps to the set of record keys that
carry it; a lookup intersects the sets of the fetch's qualifiers, smallest first,
instead of scanning every variant pushed under a URI.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

from casbah.assets.index import AssetIndex, AssetKind, AssetRecord


class MemoryAssetIndex(AssetIndex):
    def __init__(self) -> None:
        self._records: dict[str, AssetRecord] = {}
        self._by_uri: dict[str, set[str]] = defaultdict(set)
        self._by_pair: dict[tuple[str, str, str], set[str]] = defaultdict(set)

    async def put(self, record: AssetRecord) -> None:
        self._drop(record.key)
        self._records[record.key] = record
        for uri in record.uris:
            self._by_uri[uri].add(record.key)
            for name, value in record.qualifiers:
                self._by_pair[(uri, name, value)].add(record.key)

    def _drop(self, key: str) -> None:
        old = self._records.pop(key, None)
        if old is None:
            return
        for uri in old.uris:
            _discard(self._by_uri, uri, key)
            for name, value in old.qualifiers:
                _discard(self._by_pair, (uri, name, value), key)

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        keys: set[str] = set()
        for uri in uris:
            sets = [self._by_pair.get((uri, n, v), _EMPTY) for n, v in qualifiers.items()]
            if not sets:
                keys |= self._by_uri.get(uri, _EMPTY)
                continue
            sets.sort(key=len)
            found = set(sets[0])
            for other in sets[1:]:
                found &= other
                if not found:
                    break
            keys |= found
        records = [r for r in map(self._records.__getitem__, keys) if r.kind == kind and r.digest.function == function]
        if limit is None:
            return sorted(records, key=_newest, reverse=True)[offset:]
        return heapq.nlargest(offset + limit, records, key=_newest)[offset:]


_EMPTY: frozenset[str] = frozenset()


def _newest(record: AssetRecord) -> tuple[float, str]:
    """Sort key: push time, then the record key so equal times still order deterministically."""
    return record.pushed_at, record.key


def _discard(index: dict, key: object, record_key: str) -> None:
    """Remove a record key, and the index entry once empty (no growth from replaced pushes)."""
    keys = index.get(key)
    if keys is not None:
        keys.discard(record_key)
        if not keys:
            del index[key]
