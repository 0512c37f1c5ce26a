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


def _directory_blob(function: DigestFunction, **children: Digest) -> tuple[Digest, bytes]:
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

    message = re_pb2.Directory()
    for name, child in sorted(children.items()):
        message.directories.add(name=name, digest=re_pb2.Digest(hash=child.hash, size_bytes=child.size))
    data = message.SerializeToString(deterministic=True)
    return Digest.of(data, function), data


@pytest.mark.parametrize("function", [DigestFunction.SHA256, DigestFunction.BLAKE3])
def test_tree_fetch_names_the_missing_directory_and_keeps_the_function(server, function) -> None:
    """A whole tree comes back in the root's digest function (the closure check used to
    rebuild child digests as SHA-256, refusing every BLAKE3 tree with a subdirectory); a
    tree whose GetTree answer is not closed is walked level by level, and the walk names
    the directory the server lacks."""
    from casbah.client.sync import fetch_directories

    leaf, _ = _directory_blob(function)  # the empty Directory
    middle, middle_data = _directory_blob(function, leaf=Digest.of(b"not a directory", function))
    whole, whole_data = _directory_blob(function, a=_directory_blob(function, b=leaf)[0])
    inner, inner_data = _directory_blob(function, b=leaf)
    gone, _ = _directory_blob(function, x=middle)  # never uploaded
    broken, broken_data = _directory_blob(function, ok=inner, gone=gone)
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({inner: inner_data, whole: whole_data, broken: broken_data, middle: middle_data})
        got = fetch_directories(client, whole)
        assert set(got) == {whole, inner, leaf} or set(got) == {whole, inner}
        assert got[whole] == whole_data and got[inner] == inner_data
        with pytest.raises(BlobNotFound) as caught:
            client.get_tree(broken)
        assert caught.value.digest == gone
        with pytest.raises(BlobNotFound) as caught:
            fetch_directories(client, broken)
        assert caught.value.digest == gone
