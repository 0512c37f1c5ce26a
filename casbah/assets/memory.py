"""In-memory asset index: inverted indexes so lookups stay fast with many variants per URI.

Every URI and every (URI, qualifier, value) triple maps to the keys of the
records that carry it, in push order (a dict used as an ordered set; a re-push
moves its key to the end).  A lookup walks the smallest of the fetch's sets
newest first, checks the other qualifiers per record, and stops once it has the
page it needs: an exact lookup among 10,000 variants of one URI touches one
record even if some of its qualifiers are shared by every variant.
"""

from __future__ import annotations

import itertools

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.registry import KindOptions

_NONE: dict[str, None] = {}


class MemoryAssetIndex(AssetIndex):
    def __init__(self) -> None:
        self._records: dict[str, AssetRecord] = {}
        self._qualifiers: dict[str, dict[str, str]] = {}
        self._order: dict[str, int] = {}  # push sequence number per key: higher = newer
        self._sequence = itertools.count()
        self._by_uri: dict[str, dict[str, None]] = {}
        self._by_pair: dict[tuple[str, str, str], dict[str, None]] = {}

    async def put(self, record: AssetRecord) -> None:
        key = record.key
        self._drop(key)
        self._records[key] = record
        self._qualifiers[key] = dict(record.qualifiers)
        self._order[key] = next(self._sequence)
        for uri in record.uris:
            self._by_uri.setdefault(uri, {})[key] = None
            for name, value in record.qualifiers:
                self._by_pair.setdefault((uri, name, value), {})[key] = None

    def _drop(self, key: str) -> None:
        old = self._records.pop(key, None)
        if old is None:
            return
        del self._qualifiers[key], self._order[key]
        for uri in old.uris:
            _discard(self._by_uri, uri, key)
            for name, value in old.qualifiers:
                _discard(self._by_pair, (uri, name, value), key)

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        want = None if limit is None else offset + limit
        found: set[str] = set()
        for uri in uris:
            if qualifiers:
                pools = [(self._by_pair.get((uri, n, v), _NONE), n) for n, v in qualifiers.items()]
                driver, driver_name = min(pools, key=lambda p: len(p[0]))
                others = [(n, v) for n, v in qualifiers.items() if n != driver_name]
            else:
                driver, others = self._by_uri.get(uri, _NONE), []
            taken = 0
            for key in reversed(driver):  # newest first; nothing awaits, so no concurrent change
                record = self._records[key]
                if record.kind != kind or record.digest.function != function:
                    continue
                mine = self._qualifiers[key]
                if all(mine.get(n) == v for n, v in others):
                    found.add(key)
                    taken += 1
                    if want is not None and taken >= want:
                        break
        keys = sorted(found, key=self._order.__getitem__, reverse=True)
        keys = keys[offset:] if limit is None else keys[offset:offset + limit]
        return [self._records[k] for k in keys]


    async def purge_expired(self, now: float) -> int:
        expired = [key for key, record in self._records.items() if record.expired(now)]
        for key in expired:
            self._drop(key)
        return len(expired)


def _discard(index: dict, key: object, record_key: str) -> None:
    """Remove a record key, and the index entry once empty (no growth from replaced pushes)."""
    keys = index.get(key)
    if keys is not None:
        keys.pop(record_key, None)
        if not keys:
            del index[key]


@ASSET_INDEX.register("memory", KindOptions)
def _build(options: KindOptions, context: IndexContext) -> AssetIndex:
    return MemoryAssetIndex()
