"""The client's chunked transfers against real servers: a changed large file pushed
after its first version sends only the changed chunks (SpliceBlob), a pull into a
cache that holds the first version receives only those (SplitBlob), and a server
with chunking off gets plain ByteStream."""

from __future__ import annotations

import os
import random
from pathlib import Path

from casbah.client.remote import RemoteClient
from casbah.client.sync import pull, push
from casbah.digest import Digest
from casbah.local import LocalCache
from casbah.reapi.channel import RemoteSpec

SIZE = 4 << 20  # with 16 KiB chunks: ~200 chunks, far above the 128 KiB threshold


def _server(start_server, tmp_path: Path, chunking: str):
    config = tmp_path / "casbah.yaml"
    config.write_text(f'instances:\n  "": {{chunking: {chunking}}}\n')
    return start_server(["--config", str(config)])


def _versions(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(7)
    first = bytearray(rng.randbytes(SIZE))
    second = bytearray(first)
    middle = SIZE // 2
    second[middle:middle + 64 * 1024] = rng.randbytes(64 * 1024)
    a, b = tmp_path / "v1" / "big.bin", tmp_path / "v2" / "big.bin"
    for path, data in ((a, first), (b, second)):
        path.parent.mkdir()
        path.write_bytes(bytes(data))
    return a, b


def test_push_and_pull_send_only_changed_chunks(start_server, tmp_path: Path) -> None:
    server = _server(start_server, tmp_path, "{avg-chunk-size: 16K}")
    v1, v2 = _versions(tmp_path)
    local = LocalCache(tmp_path / "cache")
    local.commit(v1.parent, ref="big/v1")
    with RemoteClient(RemoteSpec(server.url)) as client:
        first = push(local, client, "big/v1")
        assert first.bytes_sent >= SIZE  # nothing on the server yet: every chunk goes
        local.commit(v2.parent, ref="big/v2")
        second = push(local, client, "big/v2")
        assert 0 < second.bytes_sent <= SIZE * 0.05, second.bytes_sent
        # the server answers the spliced blob whole, by ByteStream
        blob = Digest.of(v2.read_bytes())
        assert b"".join(client.read_stream(blob)) == v2.read_bytes()

    other = LocalCache(tmp_path / "other")
    with RemoteClient(RemoteSpec(server.url)) as client:
        assert pull(other, client, "big/v1").bytes_sent >= SIZE  # the first version, and its chunks
        got = pull(other, client, "big/v2")
    assert 0 < got.bytes_sent <= SIZE * 0.05, got.bytes_sent
    assert other.object_path(blob).read_bytes() == v2.read_bytes()


def test_server_without_chunking_gets_bytestream(start_server, tmp_path: Path) -> None:
    server = _server(start_server, tmp_path, "{enabled: false}")
    v1, _ = _versions(tmp_path)
    local = LocalCache(tmp_path / "cache")
    local.commit(v1.parent, ref="big/v1")
    with RemoteClient(RemoteSpec(server.url)) as client:
        caps = client.run(client.client.capabilities())
        assert not caps.split and not caps.splice
        assert push(local, client, "big/v1").bytes_sent >= SIZE
        blob = Digest.of(v1.read_bytes())
        assert not client.find_missing([blob])
    other = LocalCache(tmp_path / "other")
    with RemoteClient(RemoteSpec(server.url)) as client:
        got = pull(other, client, "big/v1")
    assert got.bytes_sent >= SIZE
    assert other.object_path(blob).read_bytes() == v1.read_bytes()


def test_chunked_upload_of_bytes_source(start_server, tmp_path: Path) -> None:
    """An in-memory source over the batch limit is chunked the same way as a file."""
    server = _server(start_server, tmp_path, "{avg-chunk-size: 16K}")
    data = os.urandom(3 << 20)
    blob = Digest.of(data)
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({blob: data})
        assert client.uploaded.bytes == len(data)
        assert not client.find_missing([blob])
        assert client.read_bytes(blob) == data
        client.upload({blob: data})  # again: every chunk present, nothing sent
        assert client.uploaded.bytes == len(data)
