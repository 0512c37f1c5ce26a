"""Factories for the ActionCache and asset-index contract suites (test_action_cache_contract.py,
test_asset_index_contract.py): every kind of both families, built by the family's loader as the
server builds it (so each backend sits inside its metrics wrapper).

- Local kinds run in process (memory, disk, SQLite).
- `redis` and `postgres` run against the real servers tests/scale/scale_env.py starts.
- `remote` forwards to a real `casbah serve` process on loopback: one upstream per test
  process, started on first use and stopped at exit, with instances '', 'ci' and 'ci:other'
  on one CAS.  A remote asset index pushes to the upstream, which accepts only content it
  holds, so its factory uploads a record's content (see `CONTENT`) before the push.

A factory `make(tmp_path, name)` returns an opener: each call opens the backend again over
the same data (a new connection, what another server sees); `name` keeps tests apart
(a key prefix, a PostgreSQL instance column, a file).
"""

from __future__ import annotations

import asyncio
import atexit
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from composed import start_casbah, stop_casbah

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scale"))

import scale_env

from casbah.assets.index import AssetIndex, AssetRecord, IndexContext, MetricsAssetIndex, build_asset_index
from casbah.digest import Digest
from casbah.storage.action_cache import ActionCache, MetricsActionCache, build_action_cache
from casbah.storage.base import Storage
from casbah.storage.loader import StorageLoader, load_builtin_kinds

#: Bytes of every digest a contract record names (content, references), for the remote
#: index to upload before it pushes.  Filled by the suites' record helpers.
CONTENT: dict[Digest, bytes] = {}

_UPSTREAM: dict[str, Any] = {}
UPSTREAM_INSTANCES = ("", "ci", "ci:other")


def upstream() -> str:
    """The address of the shared upstream casbah (started on first use)."""
    if "address" not in _UPSTREAM:
        work = Path(tempfile.mkdtemp(prefix="casbah-contract-upstream-"))
        config = work / "upstream.yaml"
        config.write_text("instances:\n" + "".join(f"  {name!r}: {{}}\n" for name in UPSTREAM_INSTANCES))
        proc, address = start_casbah(work / "data", "--config", str(config))
        atexit.register(stop_casbah, proc)
        _UPSTREAM.update(proc=proc, address=f"grpc://{address}")
    return _UPSTREAM["address"]


# --------------------------------------------------------------------------- ActionCache


@dataclass(frozen=True)
class AcKind:
    """An ActionCache kind under test: `make(tmp_path, name) -> opener`, and what it promises."""

    name: str
    make: Callable[[Path, str], Callable[[], ActionCache]]
    #: Entries survive closing the cache and opening it again (a restart).
    persistent: bool = True
    #: Several open caches (several servers) see each other's writes at once.
    shared: bool = True
    #: Seconds after which an entry expires, when the kind is configured to expire entries.
    ttl: int | None = None


def _ac(node: str | dict, named: dict[str, dict] | None = None) -> Callable[[], ActionCache]:
    def open_cache() -> ActionCache:
        load_builtin_kinds()
        cache = build_action_cache(StorageLoader(named or {}), node, "contract.action-cache")
        assert isinstance(cache, MetricsActionCache), "the loader wraps every ActionCache in MetricsActionCache"
        return cache

    return open_cache


def _ac_memory(tmp_path: Path, name: str) -> Callable[[], ActionCache]:
    cache = _ac({"kind": "memory", "max-size": "64M", "verify": False})()
    return lambda: cache  # "reopening" memory is the same object


AC_KINDS: list[AcKind] = [
    AcKind("memory", _ac_memory, persistent=False, shared=False),
    AcKind("disk", lambda tmp, name: _ac({"kind": "disk", "path": str(tmp / name), "verify": False}),
           shared=False),
    AcKind("named_disk", lambda tmp, name: _ac("ac", {"ac": {"kind": "disk", "path": str(tmp / name),
                                                             "max-size": "64M", "verify": False}}), shared=False),
    AcKind("redis", lambda tmp, name: _ac({"kind": "redis", "url": scale_env.redis().url,
                                           "prefix": f"contract:{name}:"})),
    AcKind("redis_ttl", lambda tmp, name: _ac({"kind": "redis", "url": scale_env.redis().url,
                                               "prefix": f"contract:{name}:", "ttl": 1}), ttl=1),
    AcKind("postgres", lambda tmp, name: _ac({"kind": "postgres", "url": scale_env.postgres().url,
                                              "instance": name})),
    AcKind("remote", lambda tmp, name: _ac({"kind": "remote", "url": upstream(), "retries": 1})),
]


# --------------------------------------------------------------------------- asset index


@dataclass(frozen=True)
class IndexKind:
    name: str
    #: `make(tmp_path, name)` -> `open(instance)`.
    make: Callable[[Path, str], Callable[[str], AssetIndex]]
    #: False for `remote`: the upstream answers its one best match (no paging, the matched URI only,
    #: its own push time) and keeps instances by the names it serves (UPSTREAM_INSTANCES).
    listing: bool = True


def _index(node: str | dict, instance: str, tmp_path: Path) -> AssetIndex:
    index = build_asset_index(node, IndexContext(instance, tmp_path, "contract.asset-index"))
    assert isinstance(index, MetricsAssetIndex), "the loader wraps every asset index in MetricsAssetIndex"
    return index


def _index_memory(tmp_path: Path, name: str) -> Callable[[str], AssetIndex]:
    opened: dict[str, AssetIndex] = {}
    return lambda instance: opened.setdefault(instance, _index("memory", instance, tmp_path))


def _index_sqlite(tmp_path: Path, name: str) -> Callable[[str], AssetIndex]:
    return lambda instance: _index("sqlite", f"{name}/{instance}", tmp_path)


def _index_shared(kind: str, url: Callable[[], str]) -> Callable[[Path, str], Callable[[str], AssetIndex]]:
    return lambda tmp_path, name: lambda instance: _index({"kind": kind, "url": url()}, f"{name}/{instance}",
                                                          tmp_path)


class UploadingIndex(AssetIndex):
    """Test plumbing for `remote`: uploads a record's content (from CONTENT) to the upstream's
    CAS before the push, as a real client pushes content before naming it."""

    def __init__(self, index: AssetIndex, cas: Storage) -> None:
        self.index = index
        self.cas = cas

    async def put(self, record: AssetRecord) -> None:
        wanted = [record.digest, *record.references_blobs, *record.references_directories]
        for digest in list(wanted):
            wanted += [d for d in _children(digest) if d not in wanted]
        results = await self.cas.write_many([(d, CONTENT[d]) for d in wanted if d in CONTENT])
        assert all(r is None for r in results), results
        await self.index.put(record)

    async def candidates(self, *args: Any, **kwargs: Any) -> list[AssetRecord]:
        return await self.index.candidates(*args, **kwargs)

    async def purge_expired(self, now: float) -> int:
        return await self.index.purge_expired(now)

    async def close(self) -> None:
        await self.index.close()
        await self.cas.close()


#: Directory digest -> the blobs it names (filled by the suite's record helper).
CHILDREN: dict[Digest, list[Digest]] = {}


def _children(digest: Digest) -> list[Digest]:
    return CHILDREN.get(digest, [])


def _index_remote(tmp_path: Path, name: str) -> Callable[[str], AssetIndex]:
    def open_index(instance: str) -> AssetIndex:
        assert instance in UPSTREAM_INSTANCES, f"the upstream serves {UPSTREAM_INSTANCES}, not {instance!r}"
        node = {"kind": "remote", "url": upstream(), "instance": instance, "retries": 1}
        load_builtin_kinds()
        cas = StorageLoader({}).build({"kind": "remote", "url": upstream(), "retries": 1}, "contract.cas")
        return UploadingIndex(_index(node, instance, tmp_path), cas)

    return open_index


INDEX_KINDS: list[IndexKind] = [
    IndexKind("memory", _index_memory),
    IndexKind("sqlite", _index_sqlite),
    IndexKind("redis", _index_shared("redis", lambda: scale_env.redis().url)),
    IndexKind("postgres", _index_shared("postgres", lambda: scale_env.postgres().url)),
    IndexKind("remote", _index_remote, listing=False),
]


def run(body: Callable[[], Any]) -> None:
    """Run an async body in a fresh event loop (each test gets its own, as the server has one)."""
    asyncio.run(body())
