"""The split itself, below the services: a blob uploaded whole and then split is kept once
(as its chunks), and files are chunked through a sliding window exactly as whole."""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

from remote_helpers import build_node, pieces, read_all

from casbah.cdc import FastCdcParams, cut_buffer, cut_fd
from casbah.digest import Digest, DigestFunction
from casbah.storage.spliced import SplicedStorage
from casbah.storage.splitting import split

PARAMS = FastCdcParams(16 * 1024)


def test_a_split_blob_is_no_longer_stored_whole_and_reads_from_its_chunks() -> None:
    data = random.Random(4).randbytes(2 << 20)
    blob = Digest.of(data)

    async def body() -> None:
        store = SplicedStorage(build_node({"kind": "memory", "max-size": "64M"}),
                               build_node({"kind": "memory", "verify": False}))
        try:
            await store.write(blob, pieces(data))
            before = (await store.stats()).get("bytes", 0)
            chunks, _ = await split(store, blob, PARAMS)
            assert len(chunks) > 10
            assert await store.inner.find_missing([blob]) == [blob]  # the whole copy is gone
            assert await store.find_missing([blob]) == []  # yet the blob is present
            assert await read_all(store, blob) == data  # assembled from its chunks
            assert (await store.read_many([blob]))[blob] == data
            if before:
                assert (await store.stats())["bytes"] <= before * 1.01
            assert (await split(store, blob, PARAMS))[0] == chunks  # answered from the record
        finally:
            await store.close()

    asyncio.run(body())


def test_a_file_chunked_through_a_window_cuts_where_the_whole_does(tmp_path: Path) -> None:
    data = os.urandom(3 << 20) + bytes(300_000) + os.urandom(1 << 20)  # a run of zeros: max-size cuts
    path = tmp_path / "f"
    path.write_bytes(data)
    whole = cut_buffer(data, PARAMS, DigestFunction.SHA256)
    fd = os.open(path, os.O_RDONLY)
    try:
        windowed = cut_fd(fd, PARAMS, DigestFunction.SHA256, window=200_000)  # raised to 2 x max + a page
        default = cut_fd(fd, PARAMS, DigestFunction.SHA256)
    finally:
        os.close(fd)
    assert windowed == whole and default == whole
