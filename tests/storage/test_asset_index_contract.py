"""The asset index contract, on every asset-index kind (`family_factories.INDEX_KINDS`):
memory, SQLite, Redis, PostgreSQL and `remote` (a real casbah upstream).

The Fetch service relies on `candidates()` returning matches most recently pushed
first and paging with limit/offset (it stops at the first complete one, and a URI
may have thousands of variants), and on the matching rule of `casbah.assets.index`:
a fetch matches when it names one of the asset's URIs and each of its qualifiers is
among the asset's with the same value.  Every kind must behave the same, so the same
cases run on all of them, in process, through `build_asset_index` (the server's
loader), against real redis-server, PostgreSQL and casbah.

A `remote` index answers the upstream's one best match (no listing, no paging, the
matched URI only), so on it the cases check that first answer; the cases that are
about listing say so and skip it.

"Most recently pushed" means push order as the index saw it, not the records'
`pushed_at` (set by whichever server took the push, whose clock may be behind).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from family_factories import CHILDREN, CONTENT, INDEX_KINDS, IndexKind

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord
from casbah.digest import Digest, DigestFunction
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

SHA256, BLAKE3 = DigestFunction.SHA256, DigestFunction.BLAKE3
BLOB, DIRECTORY = AssetKind.BLOB, AssetKind.DIRECTORY
Opener = Callable[[str], AssetIndex]


@pytest.fixture(params=INDEX_KINDS, ids=lambda kind: kind.name)
def kind(request: pytest.FixtureRequest) -> IndexKind:
    return request.param


@pytest.fixture
def uri() -> Callable[[str], str]:
    """URIs unique to the test: a shared backend (and the remote upstream) outlives it."""
    base = f"https://example.com/{uuid.uuid4().hex[:12]}/"
    return lambda name: base + name


@pytest.fixture
def run_on(kind: IndexKind, tmp_path: Path) -> Callable[[Callable[[Opener], Awaitable[None]]], None]:
    """`run_on(body)`: `body(open_index)` in a fresh event loop, where `open_index(instance)`
    opens (or reopens) this kind's index for an instance name ('', 'ci', 'ci:other')."""

    def run(body: Callable[[Opener], Awaitable[None]]) -> None:
        opener = kind.make(tmp_path, uuid.uuid4().hex[:8])
        opened: list[AssetIndex] = []

        def open_index(instance: str = "") -> AssetIndex:
            index = opener(instance)
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


def _content(kind: AssetKind, function: DigestFunction) -> Digest:
    """Real content for a record (the remote upstream checks it is in CAS and complete)."""
    data = os.urandom(32)
    blob = Digest.of(data, function)
    CONTENT[blob] = data
    if kind is BLOB:
        return blob
    directory = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=re_pb2.Digest(hash=blob.hash,
                                                                                      size_bytes=blob.size))])
    data = directory.SerializeToString(deterministic=True)
    digest = Digest.of(data, function)
    CONTENT[digest] = data
    CHILDREN[digest] = [blob]
    return digest


def record(uris: list[str], qualifiers: dict[str, str], kind: AssetKind = BLOB, function: DigestFunction = SHA256,
           pushed_at: float = 1000.0, refs: int = 0) -> AssetRecord:
    refs_blobs = tuple(_content(BLOB, function) for _ in range(refs))
    expire_at = time.time() + 3600 if refs else None
    return AssetRecord(kind, tuple(uris), tuple(sorted(qualifiers.items())), _content(kind, function),
                       references_blobs=refs_blobs, pushed_at=pushed_at, expire_at=expire_at)


def digests(records: list[AssetRecord]) -> list[Digest]:
    return [r.digest for r in records]


async def best(index: AssetIndex, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
               function: DigestFunction = SHA256) -> Digest | None:
    """The digest a fetch would get: the newest match (None when nothing matches)."""
    found = await index.candidates(kind, uris, qualifiers, function, limit=1)
    return found[0].digest if found else None


def test_matching_rule_and_newest_first(run_on, uri) -> None:
    async def body(open_index: Opener) -> None:
        index = open_index()
        a, b = uri("a.tar"), uri("b.tar")
        r1 = record([a], {"type": "tar", "arch": "x86"}, pushed_at=3000.0, refs=2)
        r2 = record([a, b], {"type": "tar"}, pushed_at=2000.0)  # clocks disagree: push order decides
        r3 = record([a], {"type": "tar", "arch": "arm"}, pushed_at=1000.0)
        r4 = record([b], {"type": "zip"})
        for r in (r1, r2, r3, r4):
            await index.put(r)

        assert await best(index, BLOB, [a], {}) == r3.digest  # the newest push naming `a`
        assert await best(index, BLOB, [a], {"type": "tar"}) == r3.digest
        assert await best(index, BLOB, [a], {"arch": "x86", "type": "tar"}) == r1.digest  # order never matters
        assert await best(index, BLOB, [a], {"type": "tar", "arch": "x86"}) == r1.digest
        assert await best(index, BLOB, [b], {}) == r4.digest
        assert await best(index, BLOB, [b], {"type": "tar"}) == r2.digest  # an alias URI of r2
        assert await best(index, BLOB, ["https://example.com/elsewhere", b], {"type": "zip"}) == r4.digest
        # A fetch qualifier the asset lacks, or has with another value: no match.
        assert await index.candidates(BLOB, [a], {"arch": "ppc"}, SHA256) == []
        assert await index.candidates(BLOB, [a], {"type": "tar", "os": "linux"}, SHA256) == []
        assert await index.candidates(BLOB, [uri("none")], {}, SHA256) == []

    run_on(body)


def test_kinds_and_digest_functions_are_separate(run_on, uri) -> None:
    async def body(open_index: Opener) -> None:
        index = open_index()
        a = uri("x")
        blob = record([a], {"type": "tar"})
        directory = record([a], {"type": "tar"}, kind=DIRECTORY)
        blake = record([a], {"type": "tar"}, function=BLAKE3)
        assert await index.candidates(DIRECTORY, [a], {}, SHA256) == []
        for r in (blob, directory, blake):
            await index.put(r)
        assert await best(index, BLOB, [a], {}) == blob.digest
        assert await best(index, DIRECTORY, [a], {"type": "tar"}) == directory.digest
        assert await best(index, BLOB, [a], {}, BLAKE3) == blake.digest
        assert await index.candidates(DIRECTORY, [a], {}, BLAKE3) == []

    run_on(body)


def test_record_fields_come_back(kind: IndexKind, run_on, uri) -> None:
    async def body(open_index: Opener) -> None:
        index = open_index()
        a = uri("fields")
        r = record([a, uri("alias")], {"type": "tar", "arch": "x86"}, pushed_at=3000.0, refs=2)
        await index.put(r)
        (got,) = await index.candidates(BLOB, [a], {"arch": "x86"}, SHA256)
        assert (got.kind, got.digest, got.qualifiers) == (r.kind, r.digest, r.qualifiers)
        assert got.expire_at == pytest.approx(r.expire_at, abs=1e-3)
        assert a in got.uris
        if kind.listing:  # a local or shared index returns the record exactly as pushed
            assert got == r and got.key == r.key

    run_on(body)


def test_repush_replaces_and_becomes_newest(run_on, uri) -> None:
    async def body(open_index: Opener) -> None:
        index = open_index()
        a = uri("a")
        old = record([a], {"type": "tar", "arch": "x86"})
        other = record([a], {"type": "tar", "arch": "arm"})
        await index.put(old)
        await index.put(other)
        assert await best(index, BLOB, [a], {}) == other.digest
        again = record([a], {"arch": "x86", "type": "tar"}, pushed_at=1.0)  # same names, new content
        assert again.key == old.key
        await index.put(again)
        assert await best(index, BLOB, [a], {}) == again.digest
        assert await best(index, BLOB, [a], {"arch": "x86"}) == again.digest

    run_on(body)


def test_listing_pages_newest_first(kind: IndexKind, run_on, uri) -> None:
    if not kind.listing:
        pytest.skip(f"{kind.name}: answers only the upstream's best match")

    async def body(open_index: Opener) -> None:
        index = open_index()
        a, b = uri("a"), uri("b")
        r1 = record([a], {"type": "tar", "arch": "x86"})
        r2 = record([a, b], {"type": "tar"})
        r3 = record([a], {"type": "tar", "arch": "arm"})
        r4 = record([b], {"type": "zip"})
        for r in (r1, r2, r3, r4):
            await index.put(r)
        assert digests(await index.candidates(BLOB, [a], {}, SHA256)) == digests([r3, r2, r1])
        assert digests(await index.candidates(BLOB, [a], {"type": "tar"}, SHA256)) == digests([r3, r2, r1])
        assert digests(await index.candidates(BLOB, [b, a], {}, SHA256)) == digests([r4, r3, r2, r1])
        assert digests(await index.candidates(BLOB, [a], {}, SHA256, limit=1, offset=1)) == [r2.digest]
        assert digests(await index.candidates(BLOB, [a], {"type": "tar"}, SHA256, limit=2, offset=1)) == \
            digests([r2, r1])
        assert digests(await index.candidates(BLOB, [a], {}, SHA256, offset=2)) == [r1.digest]
        assert await index.candidates(BLOB, [a], {}, SHA256, limit=5, offset=3) == []

    run_on(body)


def test_many_variants_page_newest_first(kind: IndexKind, run_on, uri) -> None:
    """30 variants of one URI sharing a qualifier: pages of 7 concatenate to the full order."""
    if not kind.listing:
        pytest.skip(f"{kind.name}: answers only the upstream's best match")

    async def body(open_index: Opener) -> None:
        index = open_index()
        many = uri("many")
        pushed = [record([many], {"type": "tar", "variant": str(i)}) for i in range(30)]
        for r in pushed:
            await index.put(r)
        newest_first = digests(pushed[::-1])
        for qualifiers in ({}, {"type": "tar"}):
            pages = []
            for offset in range(0, 35, 7):
                pages += digests(await index.candidates(BLOB, [many], qualifiers, SHA256, limit=7, offset=offset))
            assert pages == newest_first
        assert digests(await index.candidates(BLOB, [many], {"variant": "17"}, SHA256)) == [pushed[17].digest]

    run_on(body)


def test_instances_are_separate_and_records_persist(run_on, uri) -> None:
    async def body(open_index: Opener) -> None:
        x = uri("x")
        first, other = open_index("ci"), open_index("ci:other")  # a prefix of the other name
        r = record([x], {"q": "1"})
        await first.put(r)
        assert await other.candidates(BLOB, [x], {}, SHA256) == []
        await other.put(record([x], {"q": "2"}))
        assert await best(first, BLOB, [x], {}) == r.digest
        reopened = open_index("ci")  # another index object (new connection): what another server sees
        assert await best(reopened, BLOB, [x], {}) == r.digest

    run_on(body)


def test_purge_expired_removes_only_expired_records(kind: IndexKind, run_on, uri) -> None:
    """`purge_expired(now)` deletes what expired at or before `now` and nothing else; a
    kind whose upstream keeps the index (remote) leaves that to the upstream."""
    async def body(open_index: Opener) -> None:
        index = open_index()
        a = uri("expiring")
        now = time.time()
        gone = replace(record([a], {"v": "1"}), expire_at=now - 10)
        kept = replace(record([a], {"v": "2"}), expire_at=now + 3600)
        forever = record([a], {"v": "3"})
        for r in (gone, kept, forever):
            await index.put(r)
        purged = await index.purge_expired(now)
        if not kind.listing:
            assert purged == 0
            return
        assert purged == 1
        assert await index.candidates(BLOB, [a], {"v": "1"}, SHA256) == []
        assert digests(await index.candidates(BLOB, [a], {}, SHA256)) == [forever.digest, kept.digest]
        assert await index.purge_expired(now) == 0

    run_on(body)


def test_contract_covers_every_kind() -> None:
    ASSET_INDEX.load_builtin()
    assert sorted(kind.name for kind in INDEX_KINDS) == sorted(ASSET_INDEX.kinds)
