"""The asset index contract, on the shared backends (Redis, PostgreSQL) and the local ones.

The Fetch service relies on `candidates()` returning matches most recently pushed
first and paging with limit/offset (it stops at the first complete one, and a URI
may have thousands of variants).  The Redis and PostgreSQL indexes must behave
exactly like the memory and SQLite ones, so the same cases run on all four,
in process (the index is the unit under test; the service is tested over gRPC
elsewhere), against real redis-server and PostgreSQL.

"Most recently pushed" means push order as the index saw it, not the records'
`pushed_at` (set by whichever server took the push, whose clock may be behind).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import scale_env

from casbah.assets.index import AssetIndex, AssetKind, AssetRecord
from casbah.assets.memory import MemoryAssetIndex
from casbah.assets.postgres import PostgresAssetIndex
from casbah.assets.redis import RedisAssetIndex
from casbah.assets.sqlite import SqliteAssetIndex
from casbah.digest import Digest, DigestFunction

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3
BLOB, DIRECTORY = AssetKind.BLOB, AssetKind.DIRECTORY


def _memory(tmp_path: Path, name: str) -> Callable[[], AssetIndex]:
    index = MemoryAssetIndex()
    return lambda: index  # "reopening" a memory index is the same object


def _sqlite(tmp_path: Path, name: str) -> Callable[[], AssetIndex]:
    return lambda: SqliteAssetIndex(tmp_path / f"{name}.sqlite")


def _redis(tmp_path: Path, name: str) -> Callable[[], AssetIndex]:
    url = scale_env.redis().url
    return lambda: RedisAssetIndex(url, name)


def _postgres(tmp_path: Path, name: str) -> Callable[[], AssetIndex]:
    url = scale_env.postgres().url
    return lambda: PostgresAssetIndex(url, name)


BACKENDS = {"memory": _memory, "sqlite": _sqlite, "redis": _redis, "postgres": _postgres}


@pytest.fixture(params=sorted(BACKENDS))
def run_on(request: pytest.FixtureRequest, tmp_path: Path) -> Callable:
    """`run_on(body)`: `body(open_index)` in a fresh event loop, where `open_index(instance)`
    opens (or reopens) this backend's index for an instance name unique to the test."""
    prefix = uuid.uuid4().hex[:8]
    make = BACKENDS[request.param]
    openers: dict[str, Callable[[], AssetIndex]] = {}

    def run(body: Callable[[Callable[[str], AssetIndex]], Awaitable[None]]) -> None:
        opened: list[AssetIndex] = []

        def open_index(instance: str = "") -> AssetIndex:
            name = f"{prefix}/{instance}"
            if name not in openers:
                openers[name] = make(tmp_path, name.replace("/", "_"))
            index = openers[name]()
            opened.append(index)
            return index

        async def main() -> None:
            try:
                await body(open_index)
            finally:
                for index in {id(i): i for i in opened}.values():
                    await index.close()

        asyncio.run(main())

    return run


def record(uris: list[str], qualifiers: dict[str, str], kind: AssetKind = BLOB, function: DigestFunction = SHA256,
           pushed_at: float = 1000.0, refs: int = 0) -> AssetRecord:
    data = os.urandom(32)
    refs_blobs = tuple(Digest.of(os.urandom(8), function) for _ in range(refs))
    return AssetRecord(kind, tuple(uris), tuple(sorted(qualifiers.items())), Digest.of(data, function),
                       references_blobs=refs_blobs, pushed_at=pushed_at, expire_at=pushed_at + 60 if refs else None)


def digests(records: list[AssetRecord]) -> list[Digest]:
    return [r.digest for r in records]


def test_newest_first_matching_and_paging(run_on) -> None:
    async def body(open_index) -> None:
        index = open_index()
        a, b = "https://example.com/a.tar", "https://example.com/b.tar"
        r1 = record([a], {"type": "tar", "arch": "x86"}, pushed_at=3000.0, refs=2)
        r2 = record([a, b], {"type": "tar"}, pushed_at=2000.0)  # clocks disagree: push order decides
        r3 = record([a], {"type": "tar", "arch": "arm"}, pushed_at=1000.0)
        r4 = record([b], {"type": "zip"})
        other_kind = record([a], {"type": "tar"}, kind=DIRECTORY)
        other_fn = record([a], {"type": "tar"}, function=BLAKE3)
        for r in (r1, r2, r3, r4, other_kind, other_fn):
            await index.put(r)

        assert digests(await index.candidates(BLOB, [a], {}, SHA256)) == digests([r3, r2, r1])
        assert digests(await index.candidates(BLOB, [a], {"type": "tar"}, SHA256)) == digests([r3, r2, r1])
        assert digests(await index.candidates(BLOB, [a], {"arch": "x86", "type": "tar"}, SHA256)) == [r1.digest]
        assert await index.candidates(BLOB, [a], {"arch": "ppc"}, SHA256) == []
        assert await index.candidates(BLOB, ["https://example.com/none"], {}, SHA256) == []
        assert digests(await index.candidates(BLOB, [b, a], {}, SHA256)) == digests([r4, r3, r2, r1])
        assert digests(await index.candidates(DIRECTORY, [a], {}, SHA256)) == [other_kind.digest]
        assert digests(await index.candidates(BLOB, [a], {}, BLAKE3)) == [other_fn.digest]

        # Paging: limit and offset, with and without qualifiers.
        assert digests(await index.candidates(BLOB, [a], {}, SHA256, limit=1)) == [r3.digest]
        assert digests(await index.candidates(BLOB, [a], {}, SHA256, limit=1, offset=1)) == [r2.digest]
        assert digests(await index.candidates(BLOB, [a], {"type": "tar"}, SHA256, limit=2, offset=1)) == \
            digests([r2, r1])
        assert digests(await index.candidates(BLOB, [a], {}, SHA256, offset=2)) == [r1.digest]
        assert await index.candidates(BLOB, [a], {}, SHA256, limit=5, offset=3) == []

        # Every field comes back as pushed.
        (got,) = await index.candidates(BLOB, [a], {"arch": "x86"}, SHA256)
        assert got == r1 and got.key == r1.key

        # A re-push of the same names replaces the record and becomes the newest.
        again = record([a], {"type": "tar", "arch": "x86"}, pushed_at=1.0)
        assert again.key == r1.key
        await index.put(again)
        assert digests(await index.candidates(BLOB, [a], {}, SHA256)) == digests([again, r3, r2])

    run_on(body)


def test_many_variants_page_newest_first(run_on) -> None:
    """30 variants of one URI sharing a qualifier: pages of 7 concatenate to the full order."""

    async def body(open_index) -> None:
        index = open_index()
        uri = "https://example.com/many"
        pushed = [record([uri], {"type": "tar", "variant": str(i)}) for i in range(30)]
        for r in pushed:
            await index.put(r)
        newest_first = digests(pushed[::-1])
        for qualifiers in ({}, {"type": "tar"}):
            pages = []
            for offset in range(0, 35, 7):
                pages += digests(await index.candidates(BLOB, [uri], qualifiers, SHA256, limit=7, offset=offset))
            assert pages == newest_first
        assert digests(await index.candidates(BLOB, [uri], {"variant": "17"}, SHA256)) == [pushed[17].digest]

    run_on(body)


def test_instances_are_separate_and_records_persist(run_on) -> None:
    async def body(open_index) -> None:
        uri = "https://example.com/x"
        first, other = open_index("ci"), open_index("ci:other")  # a prefix of the other name
        r = record([uri], {"q": "1"})
        await first.put(r)
        assert await other.candidates(BLOB, [uri], {}, SHA256) == []
        await other.put(record([uri], {"q": "2"}))
        assert digests(await first.candidates(BLOB, [uri], {}, SHA256)) == [r.digest]
        reopened = open_index("ci")  # another index object (new connection): what another server sees
        assert digests(await reopened.candidates(BLOB, [uri], {}, SHA256)) == [r.digest]

    run_on(body)
