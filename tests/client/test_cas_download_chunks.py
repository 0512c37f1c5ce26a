"""`casbah cas download` of a large blob over an older version at the destination (or
with a local cache holding it) fetches only the chunks it lacks, against a real server
with 16 KiB average chunks; a server with chunking off streams the blob whole."""

from __future__ import annotations

import random
from pathlib import Path

from client_helpers import cli

from casbah.client.download import download_file
from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.local import LocalCache
from casbah.reapi.channel import RemoteSpec

SIZE = 4 << 20


def _server(start_server, tmp_path: Path, chunking: str):
    config = tmp_path / "casbah.yaml"
    config.write_text(f'instances:\n  "": {{chunking: {chunking}}}\n')
    return start_server(["--config", str(config)])


def _versions(tmp_path: Path) -> tuple[Path, Path]:
    rng = random.Random(16)
    first = rng.randbytes(SIZE)
    second = bytearray(first)
    second[SIZE // 3:SIZE // 3 + 64 * 1024] = rng.randbytes(64 * 1024)
    a, b = tmp_path / "v1.bin", tmp_path / "v2.bin"
    a.write_bytes(first)
    b.write_bytes(bytes(second))
    return a, b


def test_download_over_an_older_file_fetches_only_missing_chunks(start_server, tmp_path: Path) -> None:
    server = _server(start_server, tmp_path, "{avg-chunk-size: 16K}")
    v1, v2 = _versions(tmp_path)
    d1, d2 = Digest.of(v1.read_bytes()), Digest.of(v2.read_bytes())
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({d1: v1, d2: v2})
        dest = tmp_path / "out.bin"
        dest.write_bytes(v1.read_bytes())
        received = download_file(client, d2, dest)
        assert 0 < received <= SIZE * 0.05, received
        assert dest.read_bytes() == v2.read_bytes()
        assert not (tmp_path / "out.bin.casbah-tmp").exists()

        # no file at the destination, but a local cache holding v1's chunks (kept by a download)
        cache = LocalCache(tmp_path / "cache")
        fresh = tmp_path / "fresh.bin"
        assert download_file(client, d1, fresh, cache) >= SIZE  # nothing local: every chunk travels
        fresh.unlink()
        received = download_file(client, d2, fresh, cache)
        assert 0 < received <= SIZE * 0.05, received
        assert fresh.read_bytes() == v2.read_bytes()
        assert download_file(client, d2, tmp_path / "again.bin", cache) == 0  # the fetched chunks were kept

    # the command line: same path, a summary of what travelled
    dest.write_bytes(v1.read_bytes())
    result = cli("cas", "download", "--remote", server.url, "--blob", str(d2), "-o", str(dest))
    assert dest.read_bytes() == v2.read_bytes()
    assert "received" in result.stderr and "4.0 MiB received" not in result.stderr, result.stderr


def test_server_without_chunking_streams_the_blob_whole(start_server, tmp_path: Path) -> None:
    server = _server(start_server, tmp_path, "{enabled: false}")
    v1, v2 = _versions(tmp_path)
    d2 = Digest.of(v2.read_bytes())
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({d2: v2})
        dest = tmp_path / "out.bin"
        dest.write_bytes(v1.read_bytes())
        assert download_file(client, d2, dest) == SIZE
        assert dest.read_bytes() == v2.read_bytes()

