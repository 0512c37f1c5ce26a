"""The storage contract: what every backend promises the services, tested on each.

The services rely on these promises (FindMissingBlobs order, NOT_FOUND before any
byte of a read, nothing visible until verified, per-blob batch errors), so each
backend in `contract.FACTORIES` runs every case here.  Storage is exercised in
process because this is the layer under test; the services are tested over gRPC
elsewhere.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from contract import FACTORIES, Body, Factory, run_on

from casbah.digest import Digest, DigestFunction
from casbah.digest_batch import DigestArray
from casbah.errors import BlobNotFound, DigestMismatch, InvalidArgument, OutOfRange, ResourceExhausted
from casbah.storage.base import CHUNK_SIZE, Storage
from casbah.storage.memory import MemoryStorage

MiB = 1 << 20


@pytest.fixture(params=FACTORIES, ids=lambda factory: factory.__name__)
def on_storage(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Body], None]:
    """`on_storage(body)`: run the async `body(storage)` on a fresh store of each backend."""
    factory: Factory = request.param
    return lambda body: run_on(factory, tmp_path, body)


def blob(size: int, function: DigestFunction = DigestFunction.SHA256) -> tuple[Digest, bytes]:
    data = os.urandom(size)
    return Digest.of(data, function), data


async def stream(data: bytes, piece: int = 64 * 1024, pause: bool = False) -> AsyncIterator[bytes]:
    """`data` in pieces, as a service hands an upload to storage; `pause` yields to
    the event loop between pieces so concurrent writers interleave."""
    for pos in range(0, len(data), piece):
        if pause:
            await asyncio.sleep(0)
        yield data[pos : pos + piece]


async def read_all(storage: Storage, digest: Digest, offset: int = 0, limit: int = 0) -> bytes:
    chunks = [chunk async for chunk in await storage.read(digest, offset, limit)]
    return b"".join(chunks)


def test_find_missing_keeps_input_order_and_reports_only_absent(on_storage) -> None:
    async def body(storage: Storage) -> None:
        present = [blob(n) for n in (1, 100, 5000)]
        absent = [blob(n)[0] for n in (2, 200, 6000)]
        for digest, data in present:
            await storage.write_bytes(digest, data)
        query = [absent[0], present[0][0], absent[1], present[1][0], present[2][0], absent[2]]
        assert await storage.find_missing(query) == absent
        assert await storage.find_missing([]) == []
        assert await storage.find_missing([d for d, _ in present]) == []
        # Same size, another hash: absent, as is the same hex under another function.
        d0 = present[0][0]
        other = Digest(d0.hash[:-1] + ("0" if d0.hash[-1] != "0" else "1"), d0.size)
        other_size = Digest(d0.hash, d0.size + 1)
        other_function = Digest(d0.hash, d0.size, DigestFunction.BLAKE3)
        assert await storage.find_missing([other, other_size, other_function]) == [other, other_size, other_function]
        assert await storage.has(d0)
        assert not await storage.has(other_function)

    on_storage(body)


def test_read_of_absent_blob_raises_before_any_data(on_storage) -> None:
    async def body(storage: Storage) -> None:
        digest, _ = blob(3 * MiB)
        with pytest.raises(BlobNotFound):
            await storage.read(digest)  # the await itself, not the iteration, must raise
        with pytest.raises(BlobNotFound):
            await storage.read(digest, 10, 10)
        with pytest.raises(BlobNotFound):
            await storage.read_bytes(digest)

    on_storage(body)


@pytest.mark.parametrize("size", [1000, 3 * MiB + 17], ids=["small", "multichunk"])
def test_read_with_offset_and_limit(on_storage, size: int) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(size)
        await storage.write(digest, stream(data))
        cases = [(0, 0), (1, 0), (size - 1, 0), (0, 1), (7, 100), (size // 2, 0), (3, size), (size - 5, 100)]
        if size > 2 * MiB:
            cases += [(MiB - 3, MiB + 6), (CHUNK_SIZE, CHUNK_SIZE), (1, 2 * MiB)]
        for offset, limit in cases:
            end = size if limit == 0 else min(size, offset + limit)
            assert await read_all(storage, digest, offset, limit) == data[offset:end], (offset, limit)
        assert await read_all(storage, digest, size, 0) == b""  # offset == size: empty, not an error
        assert await read_all(storage, digest, size, 10) == b""
        for offset in (size + 1, size + MiB, -1):
            with pytest.raises(OutOfRange):
                await storage.read(digest, offset)
        with pytest.raises(InvalidArgument):
            await storage.read(digest, 0, -1)
        assert await storage.read_bytes(digest) == data

    on_storage(body)


def test_wrong_hash_is_rejected_and_leaves_nothing(on_storage) -> None:
    async def body(storage: Storage) -> None:
        for size in (10, 3 * MiB + 1):
            digest, data = blob(size)
            bad = bytearray(data)
            bad[size // 2] ^= 1
            with pytest.raises(DigestMismatch):
                await storage.write(digest, stream(bytes(bad)))
            assert await storage.find_missing([digest]) == [digest]
            with pytest.raises(BlobNotFound):
                await storage.read(digest)
            with pytest.raises(DigestMismatch):
                await storage.write_bytes(digest, bytes(bad))
            assert await storage.find_missing([digest]) == [digest]
            # The right bytes still go in afterwards.
            await storage.write(digest, stream(data))
            assert await read_all(storage, digest) == data

    on_storage(body)


@pytest.mark.parametrize("size", [100, 2 * MiB + 3], ids=["small", "multichunk"])
def test_too_many_or_too_few_bytes_are_rejected(on_storage, size: int) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(size)
        for wrong in (data + b"x", data + os.urandom(MiB), data[:-1], data[: size // 2], b""):
            with pytest.raises(DigestMismatch):
                await storage.write(digest, stream(wrong))
            with pytest.raises(DigestMismatch):
                await storage.write_bytes(digest, wrong)
        assert await storage.find_missing([digest]) == [digest]
        with pytest.raises(BlobNotFound):
            await storage.read(digest)

    on_storage(body)


def test_too_long_stream_is_rejected_before_it_ends(on_storage) -> None:
    """An upload that overruns its digest's size fails at once: storage must not
    read (and buffer or store) an endless stream before checking."""

    async def body(storage: Storage) -> None:
        digest, data = blob(MiB)
        sent = 0

        async def endless() -> AsyncIterator[bytes]:
            nonlocal sent
            while True:
                sent += len(data)
                yield data

        with pytest.raises(DigestMismatch):
            await storage.write(digest, endless())
        assert sent <= 2 * len(data)
        assert await storage.find_missing([digest]) == [digest]

    on_storage(body)


def test_blake3_blobs(on_storage) -> None:
    async def body(storage: Storage) -> None:
        small, small_data = blob(300, DigestFunction.BLAKE3)
        big, big_data = blob(2 * MiB + 5, DigestFunction.BLAKE3)
        await storage.write_bytes(small, small_data)
        await storage.write(big, stream(big_data))
        assert await storage.read_bytes(small) == small_data
        assert await read_all(storage, big) == big_data
        assert await read_all(storage, big, MiB, 10) == big_data[MiB : MiB + 10]
        # Same bytes under SHA-256 are another blob; a SHA-256 digest of the same hex is absent.
        as_sha = Digest(small.hash, small.size, DigestFunction.SHA256)
        assert await storage.find_missing([small, as_sha, big]) == [as_sha]
        with pytest.raises(BlobNotFound):
            await storage.read(as_sha)
        # A BLAKE3 digest is checked with BLAKE3: the SHA-256 hash of the data does not pass.
        sha = Digest.of(small_data)
        with pytest.raises(DigestMismatch):
            await storage.write_bytes(Digest(sha.hash, sha.size, DigestFunction.BLAKE3), small_data)
        wrong = bytearray(big_data)
        wrong[-1] ^= 0xFF
        other, _ = blob(len(wrong), DigestFunction.BLAKE3)
        with pytest.raises(DigestMismatch):
            await storage.write(other, stream(bytes(wrong)))
        assert await storage.find_missing([other]) == [other]

    on_storage(body)


@pytest.mark.parametrize("function", list(DigestFunction), ids=str)
def test_every_digest_function_round_trips(on_storage, function: DigestFunction) -> None:
    """Each function is verified with itself, in batches and streams, and listed back under itself."""
    async def body(storage: Storage) -> None:
        small, small_data = blob(300, function)
        big, big_data = blob(2 * MiB + 5000, function)  # several chunks; over the batch limit: ByteStream to a remote
        await storage.write_bytes(small, small_data)
        await storage.write(big, stream(big_data, piece=10_000))
        assert await storage.find_missing([small, big]) == []
        assert await storage.read_bytes(small) == small_data
        assert await read_all(storage, big, 1000, 3000) == big_data[1000:4000]
        forged = Digest(Digest.of(b"x" * 300, function).hash, 300, function)
        with pytest.raises(DigestMismatch):
            await storage.write_bytes(forged, small_data)
        listed = {info.digest async for info in storage.iterate()}
        assert {small, big} <= listed

    on_storage(body)


def test_same_hex_under_two_functions_is_two_blobs(on_storage) -> None:
    """Up to 1 KiB, SHA256TREE is SHA-256: the same hex names a blob under each function,
    and storage must keep them apart (a key without the function would merge them)."""
    async def body(storage: Storage) -> None:
        data = os.urandom(700)
        tree = Digest.of(data, DigestFunction.SHA256TREE)
        plain = Digest.of(data, DigestFunction.SHA256)
        assert tree.hash == plain.hash and tree.key != plain.key
        await storage.write_bytes(tree, data)
        assert await storage.find_missing([plain, tree]) == [plain]
        with pytest.raises(BlobNotFound):
            await storage.read(plain)
        await storage.write_bytes(plain, data)
        assert await storage.find_missing([plain, tree]) == []
        assert await storage.read_bytes(plain) == data == await storage.read_bytes(tree)
        # Last: the remote kind cannot list or delete (it skips from here).
        assert {info.digest async for info in storage.iterate()} == {tree, plain}
        assert await storage.delete([tree]) == 1
        assert await storage.find_missing([plain, tree]) == [tree]
        assert await storage.read_bytes(plain) == data

    on_storage(body)


def test_write_many_reports_per_blob_errors(on_storage) -> None:
    async def body(storage: Storage) -> None:
        good1, good1_data = blob(10)
        good2, good2_data = blob(70_000)
        bad_hash, bad_hash_data = blob(20)
        bad_size, bad_size_data = blob(30)
        already, already_data = blob(40)
        await storage.write_bytes(already, already_data)
        results = await storage.write_many([
            (good1, good1_data),
            (bad_hash, bad_hash_data[::-1]),
            (good2, good2_data),
            (bad_size, bad_size_data[:-1]),
            (already, already_data),
            (good1, good1_data),  # the same blob twice in one batch
        ])
        assert [type(r) for r in results] == [
            type(None), DigestMismatch, type(None), DigestMismatch, type(None), type(None)
        ]
        assert await storage.find_missing([good1, bad_hash, good2, bad_size, already]) == [bad_hash, bad_size]
        assert await storage.read_bytes(good1) == good1_data
        assert await storage.read_bytes(good2) == good2_data
        assert await storage.write_many([]) == []

    on_storage(body)


def test_read_many_skips_missing(on_storage) -> None:
    async def body(storage: Storage) -> None:
        present = [blob(n) for n in (1, 1000, 100_000)]
        absent = [blob(n)[0] for n in (5, 50)]
        assert await storage.write_many(present) == [None, None, None]
        found = await storage.read_many([absent[0], present[0][0], present[1][0], absent[1], present[2][0]])
        assert found == dict(present)
        assert await storage.read_many(absent) == {}
        assert await storage.read_many([]) == {}

    on_storage(body)


def test_delete_returns_how_many_were_present(on_storage) -> None:
    async def body(storage: Storage) -> None:
        a, a_data = blob(100)
        b, b_data = blob(2 * MiB)
        c, c_data = blob(300)
        absent, _ = blob(400)
        for digest, data in ((a, a_data), (b, b_data), (c, c_data)):
            await storage.write(digest, stream(data))
        assert await storage.delete([a, absent, b]) == 2
        assert await storage.find_missing([a, b, c, absent]) == [a, b, absent]
        with pytest.raises(BlobNotFound):
            await storage.read(b)
        assert await storage.delete([a, b, absent]) == 0
        assert await storage.delete([]) == 0
        assert await storage.read_bytes(c) == c_data
        await storage.write_bytes(a, a_data)  # a deleted blob can be stored again
        assert await storage.read_bytes(a) == a_data

    on_storage(body)


def test_iterate_lists_what_is_stored(on_storage) -> None:
    async def body(storage: Storage) -> None:
        assert [info async for info in storage.iterate()] == []
        blobs = [blob(n) for n in (1, 10, 100_000)] + [blob(77, DigestFunction.BLAKE3)]
        for digest, data in blobs:
            await storage.write_bytes(digest, data)
        deleted = blobs.pop()[0]
        await storage.delete([deleted])
        infos = [info async for info in storage.iterate()]
        assert sorted((i.digest, i.stored_size) for i in infos) == sorted((d, len(x)) for d, x in blobs)
        assert all(i.last_access > 0 for i in infos)

    on_storage(body)


@pytest.mark.parametrize("sent", [10, 3 * MiB // 2], ids=["small", "multichunk"])
def test_writer_stream_failing_midway_leaves_nothing(on_storage, sent: int) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(3 * MiB)

        class ClientWentAway(Exception):
            pass

        async def broken() -> AsyncIterator[bytes]:
            async for chunk in stream(data[:sent], 256 * 1024):
                yield chunk
            raise ClientWentAway

        with pytest.raises(ClientWentAway):
            await storage.write(digest, broken())
        assert await storage.find_missing([digest]) == [digest]
        with pytest.raises(BlobNotFound):
            await storage.read(digest)
        await storage.write(digest, stream(data))  # and a retry succeeds
        assert await read_all(storage, digest) == data

    on_storage(body)


def test_cancelled_writer_leaves_nothing(on_storage) -> None:
    """A service cancels the storage write when its client disconnects for good."""

    async def body(storage: Storage) -> None:
        digest, data = blob(3 * MiB)
        halfway = asyncio.Event()

        async def stalls() -> AsyncIterator[bytes]:
            async for chunk in stream(data[: 2 * MiB], 256 * 1024):
                yield chunk
            halfway.set()
            await asyncio.Event().wait()  # the client never sends the rest
            yield b""

        task = asyncio.create_task(storage.write(digest, stalls()))
        await halfway.wait()
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await storage.find_missing([digest]) == [digest]
        await storage.write(digest, stream(data))
        assert await read_all(storage, digest) == data

    on_storage(body)


def test_concurrent_writers_of_the_same_blob(on_storage) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(3 * MiB + 11)
        small, small_data = blob(5000)
        writers = [storage.write(digest, stream(data, 128 * 1024, pause=True)) for _ in range(10)]
        writers += [storage.write_bytes(digest, data), storage.write_many([(digest, data)])]
        writers += [storage.write_bytes(small, small_data) for _ in range(12)]
        results = await asyncio.gather(*writers)
        assert results[11] == [None]
        assert await storage.find_missing([digest, small]) == []
        assert await read_all(storage, digest) == data
        assert await storage.read_bytes(small) == small_data
        infos = [info async for info in storage.iterate()]
        assert sorted(i.digest for i in infos) == sorted([digest, small])

    on_storage(body)


def test_large_blob_streams_in_bounded_chunks(on_storage) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(5 * MiB + 123)
        await storage.write(digest, stream(data, 16 * 1024))  # Bazel's chunk size
        chunks = [chunk async for chunk in await storage.read(digest)]
        assert all(len(chunk) <= CHUNK_SIZE for chunk in chunks)
        assert len(chunks) >= 6
        assert b"".join(chunks) == data
        # A stream the caller abandons half-way can be closed, and the blob stays readable.
        reader = await storage.read(digest)
        assert len(await anext(aiter(reader))) <= CHUNK_SIZE
        await reader.aclose()  # type: ignore[attr-defined]
        assert await read_all(storage, digest, MiB) == data[MiB:]

    on_storage(body)


def test_empty_blob_can_be_stored_and_read(on_storage) -> None:
    async def body(storage: Storage) -> None:
        empty = Digest.of(b"")
        await storage.write(empty, stream(b""))
        await storage.write_bytes(empty, b"")
        assert await storage.find_missing([empty]) == []
        assert await read_all(storage, empty) == b""
        assert await storage.read_many([empty]) == {empty: b""}

    on_storage(body)


def test_rewriting_a_present_blob_is_harmless(on_storage) -> None:
    async def body(storage: Storage) -> None:
        digest, data = blob(2 * MiB)
        await storage.write(digest, stream(data))
        await storage.write(digest, stream(data))
        await storage.write_bytes(digest, data)
        assert await read_all(storage, digest) == data
        assert len([info async for info in storage.iterate()]) == 1

    on_storage(body)


def test_contract_covers_every_factory() -> None:
    """Guards the registry: test ids are unique and the in-tree backends are all there."""
    names = [factory.__name__ for factory in FACTORIES]
    assert len(names) == len(set(names))
    assert {"memory", "disk", "disk_quota"} <= set(names)



def test_memory_refuses_a_blob_larger_than_the_store_and_keeps_the_rest() -> None:
    """Backend-specific (bounded memory): storing such a blob would evict everything,
    then the blob itself; it must be refused, per blob in batches, evicting nothing."""
    async def main() -> None:
        storage = MemoryStorage(max_bytes=1000)
        kept, kept_data = blob(500)
        huge, huge_data = blob(2000)
        await storage.write_bytes(kept, kept_data)
        with pytest.raises(ResourceExhausted):
            await storage.write_bytes(huge, huge_data)
        with pytest.raises(ResourceExhausted):
            await storage.write(huge, stream(huge_data))
        results = await storage.write_many([(huge, huge_data)])
        assert isinstance(results[0], ResourceExhausted)
        assert await storage.find_missing([kept, huge]) == [huge]
        assert (await storage.stats())["evictions"] == 0

    asyncio.run(main())


def test_find_missing_takes_a_digest_array(on_storage) -> None:
    """The server hands FindMissingBlobs to storage as a `DigestArray` (digest_batch.py):
    every backend answers it as it answers a list, whatever it returns."""
    async def body(storage: Storage) -> None:
        present = [blob(100 + n) for n in range(12)]
        absent = [blob(100 + n)[0] for n in range(28)]
        for digest, data in present:
            await storage.write_bytes(digest, data)
        query = [d for pair in zip(absent, [d for d, _ in present] + absent[12:], strict=False) for d in pair]
        query = list(dict.fromkeys(query))
        expected = [d for d in query if d in set(absent)]
        array = DigestArray.of(query, DigestFunction.SHA256)
        missing = await storage.find_missing(array)
        assert list(missing) == expected
        if isinstance(missing, DigestArray):  # positions into the request, for the response
            assert [query[i] for i in missing.positions.tolist()] == expected

    on_storage(body)
