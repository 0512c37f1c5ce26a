"""The sync facade (`casbah.client.remote.RemoteClient`) over the one async client,
against a real `casbah serve` on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from casbah.client.remote import RemoteClient
from casbah.digest import Digest, DigestFunction
from casbah.errors import BlobNotFound, NotFound
from casbah.reapi.channel import RemoteSpec


def test_mixed_digest_functions_are_grouped_per_request(server, tmp_path: Path) -> None:
    """One call with SHA-256 and BLAKE3 blobs: every request names one function.
    (The sync client used to put them all in a request named for the first one.)"""
    blobs: dict[Digest, bytes | Path] = {}
    for i in range(6):
        data = os.urandom(100 + i)
        blobs[Digest.of(data, DigestFunction.SHA256 if i % 2 else DigestFunction.BLAKE3)] = data
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 * 1024 * 1024))  # beyond a batch: ByteStream, from a file
    blobs[Digest.of(big.read_bytes(), DigestFunction.BLAKE3)] = big
    with RemoteClient(RemoteSpec(server.url)) as client:
        assert set(client.find_missing(blobs)) == set(blobs)
        client.upload(blobs)
        assert client.find_missing(blobs) == []
        got: dict[Digest, bytes] = {}
        client.download(blobs, lambda d, chunks: got.__setitem__(d, b"".join(chunks)))
    assert got == {d: s if isinstance(s, bytes) else s.read_bytes() for d, s in blobs.items()}


def test_misses_are_the_not_found_family(server) -> None:
    absent = Digest.of(b"never uploaded")
    with RemoteClient(RemoteSpec(server.url)) as client:
        with pytest.raises(BlobNotFound):
            client.download([absent], lambda d, chunks: None)
        with pytest.raises(BlobNotFound):
            client.read_bytes(absent)
        with pytest.raises(NotFound):
            client.run(client.client.fetch_blob(["https://example.com/nothing-here"]))
