"""`casbah cas upload|download|tree|missing` against a real `casbah serve`: no local cache."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import add_awkward_entries, assert_same_tree, cli, small_tree, start_module_server

from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.reapi.channel import RemoteSpec
from casbah.tree import build_tree


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One server for the module (shadows the per-test one from tests/conftest.py)."""
    process, stop = start_module_server(request, tmp_path_factory)
    yield process
    stop()



def test_upload_directory_prints_root_and_download_restores_it(tmp_path: Path, server) -> None:
    tree = small_tree(tmp_path / "tree", "cas")
    add_awkward_entries(tree)
    (tree / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))  # beyond a batch: ByteStream both ways
    (tree / "copy-of-readme").write_text("read me\n")  # same content twice: one blob, two files
    expected = build_tree(tree).root
    out = cli("cas", "upload", "--remote", server.url, str(tree)).stdout
    assert out == f"{expected} {tree}\n"
    with RemoteClient(RemoteSpec(server.url)) as client:
        assert client.find_missing(build_tree(tree).files) == []

    restored = tmp_path / "restored"
    result = cli("cas", "download", "--remote", server.url, str(expected), "-o", str(restored))
    assert f"downloaded {expected}" in result.stderr
    assert_same_tree(tree, restored, exact_modes=True)

    # Into a non-empty directory: refused, nothing touched.
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    refused = cli("cas", "download", "--remote", server.url, str(expected), "-o", str(busy), expect=1)
    assert "not an empty directory" in refused.stderr
    assert os.listdir(busy) == ["x"]


def test_upload_and_download_single_files(tmp_path: Path, server) -> None:
    small = tmp_path / "small.txt"
    small.write_text("hello\n")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(6 * 1024 * 1024 + 3))
    out = cli("cas", "upload", "--remote", server.url, str(small), str(big)).stdout.splitlines()
    d_small, d_big = Digest.of(small.read_bytes()), Digest.of(big.read_bytes())
    assert out == [f"{d_small} {small}", f"{d_big} {big}"]
    for digest, original in ((d_small, small), (d_big, big)):
        target = tmp_path / f"down-{original.name}"
        cli("cas", "download", "--remote", server.url, str(digest), "-o", str(target))
        assert target.read_bytes() == original.read_bytes()
    # A blob that happens to be a tree root can still be fetched as bytes.
    tree = small_tree(tmp_path / "tree", "blob")
    root = build_tree(tree).root
    cli("cas", "upload", "--remote", server.url, str(tree))
    raw = tmp_path / "root.bin"
    cli("cas", "download", "--remote", server.url, "--blob", str(root), "-o", str(raw))
    assert Digest.of(raw.read_bytes()) == root


def test_download_of_an_absent_digest_fails_cleanly(tmp_path: Path, server) -> None:
    absent = Digest.of(b"never uploaded")
    target = tmp_path / "out"
    result = cli("cas", "download", "--remote", server.url, str(absent), "-o", str(target), expect=1)
    assert "not found" in result.stderr
    assert not target.exists() and not (tmp_path / "out.casbah-tmp").exists()
    result = cli("cas", "download", "--remote", server.url, "--tree", str(absent), "-o", str(target), expect=1)
    assert "not found" in result.stderr.lower()
    bad = cli("cas", "download", "--remote", server.url, "xyz/1", "-o", str(target), expect=1)
    assert "invalid sha256 hash" in bad.stderr


def test_tree_lists_files_dirs_and_symlinks(tmp_path: Path, server) -> None:
    tree = small_tree(tmp_path / "tree", "list")
    build = build_tree(tree)
    cli("cas", "upload", "--remote", server.url, str(tree))
    lines = cli("cas", "tree", "--remote", server.url, str(build.root)).stdout.splitlines()
    readme = Digest.of(b"read me\n")
    run = Digest.of((tree / "run.sh").read_bytes())
    main_c = Digest.of((tree / "src" / "main.c").read_bytes())
    assert f"{readme} - README" in lines
    assert f"{run} x run.sh" in lines
    assert f"{main_c} - src/main.c" in lines
    assert any(line.endswith(" l latest -> src/main.c") for line in lines)
    assert any(line.endswith(" d src/") for line in lines)
    assert any(line.endswith(" d src/pkg/") for line in lines)
    assert len(lines) == 7  # 4 files, 1 symlink, 2 directories
    absent = cli("cas", "tree", "--remote", server.url, str(Digest.of(b"no tree")), expect=1)
    assert "not found" in absent.stderr.lower()


def test_missing_prints_absent_digests(tmp_path: Path, server) -> None:
    present = tmp_path / "present.txt"
    present.write_text("present\n")
    cli("cas", "upload", "--remote", server.url, str(present))
    d_present = Digest.of(present.read_bytes())
    d_absent = Digest.of(b"absent\n")
    empty = Digest.of(b"")
    assert cli("cas", "missing", "--remote", server.url, str(d_present), str(empty)).stdout == ""
    result = cli("cas", "missing", "--remote", server.url, str(d_present), str(d_absent), expect=1)
    assert result.stdout == f"{d_absent}\n"
    bad = cli("cas", "missing", "--remote", server.url, "nonsense", expect=2)
    assert "HASH/SIZE" in bad.stderr


def test_batch_update_wire_encoding_is_canonical() -> None:
    """The client writes BatchUpdateBlobsRequest bytes itself (one copy of the data instead of
    three); they must be exactly what protobuf's deterministic serialization produces."""
    from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
    from casbah.reapi.wire import encode_batch_update

    for instance, function in (("", 1), ("a/b", 9), ("x" * 300, 0)):
        blobs = [(Digest.of(d), d) for d in (b"", b"x", os.urandom(200), os.urandom(70_000), os.urandom(3 << 20))]
        raw = encode_batch_update(instance, function, blobs)
        message = re_pb2.BatchUpdateBlobsRequest(
            instance_name=instance, digest_function=function,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=d.to_proto(), data=b) for d, b in blobs])
        assert raw == message.SerializeToString(deterministic=True)
