"""casbah.tree: local directories as REAPI Directory messages, and tree completeness.

A directory must hash to the same root digest on every machine and every run,
or origin-fetched trees and client uploads never hit the cache; a special file
silently dropped would produce a different tree without anyone noticing.  And a
tree reported complete must really be downloadable, or an asset hit fails later.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from pathlib import Path

import pytest

from casbah.digest import Digest, DigestFunction
from casbah.errors import InvalidArgument
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.storage.memory import MemoryStorage
from casbah.tree import CompleteTrees, build_tree, missing_in_tree


def pd(data: bytes) -> re_pb2.Digest:
    return re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def ser(directory: re_pb2.Directory) -> bytes:
    return directory.SerializeToString(deterministic=True)


def make_sample(root: Path) -> None:
    """a.txt (executable), b.txt, link -> a.txt, empty/, z/inner.txt."""
    root.mkdir()
    (root / "b.txt").write_bytes(b"bee\n")
    (root / "a.txt").write_bytes(b"#!/bin/sh\n")
    (root / "a.txt").chmod(0o755)
    os.symlink("a.txt", root / "link")
    (root / "empty").mkdir()
    (root / "z").mkdir()
    (root / "z" / "inner.txt").write_bytes(b"inner\n")


def test_matches_hand_built_canonical_directories(tmp_path: Path) -> None:
    """The root digest equals one computed from Directory messages built by hand from the spec."""
    make_sample(tmp_path / "t")
    z = re_pb2.Directory(files=[re_pb2.FileNode(name="inner.txt", digest=pd(b"inner\n"))])
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="a.txt", digest=pd(b"#!/bin/sh\n"), is_executable=True),
               re_pb2.FileNode(name="b.txt", digest=pd(b"bee\n"))],
        directories=[re_pb2.DirectoryNode(name="empty", digest=pd(b"")),
                     re_pb2.DirectoryNode(name="z", digest=pd(ser(z)))],
        symlinks=[re_pb2.SymlinkNode(name="link", target="a.txt")],
    )
    build = build_tree(tmp_path / "t")
    assert (build.root.hash, build.root.size) == (pd(ser(root)).hash, pd(ser(root)).size_bytes)
    assert build.directories[build.root] == ser(root)
    assert build.file_count == 3
    assert build.total_bytes == len(b"bee\n#!/bin/sh\ninner\n")


def test_names_sorted_by_code_point(tmp_path: Path) -> None:
    """REAPI requires entries sorted by name; directory listing order must not leak in."""
    root = tmp_path / "t"
    root.mkdir()
    names = ["b", "a", "B", "_x", "10", "9", "é", "Z", "aa"]
    for name in names:
        (root / name).write_bytes(name.encode())
    for name in ("dz", "Dy", "d-"):
        (root / name).mkdir()
        (root / name / "f").write_bytes(b"")
    build = build_tree(root)
    directory = re_pb2.Directory.FromString(build.directories[build.root])
    files = [n.name for n in directory.files]
    assert files == sorted(names, key=lambda s: s.encode())
    assert [n.name for n in directory.directories] == ["Dy", "d-", "dz"]


def test_executable_bit_changes_the_digest(tmp_path: Path) -> None:
    make_sample(tmp_path / "t")
    before = build_tree(tmp_path / "t").root
    (tmp_path / "t" / "b.txt").chmod(0o755)
    after = build_tree(tmp_path / "t")
    assert after.root != before
    directory = re_pb2.Directory.FromString(after.directories[after.root])
    assert {n.name: n.is_executable for n in directory.files} == {"a.txt": True, "b.txt": True}


def test_symlink_kept_verbatim_not_followed(tmp_path: Path) -> None:
    root = tmp_path / "t"
    make_sample(root)
    os.symlink("../outside/../nowhere", root / "z" / "dangling")
    os.symlink("z", root / "dirlink")
    build = build_tree(root)
    top = re_pb2.Directory.FromString(build.directories[build.root])
    assert [(s.name, s.target) for s in top.symlinks] == [("dirlink", "z"), ("link", "a.txt")]
    assert "dirlink" not in [d.name for d in top.directories]
    z_digest = next(d.digest for d in top.directories if d.name == "z")
    z = re_pb2.Directory.FromString(build.directories[Digest(z_digest.hash, z_digest.size_bytes)])
    assert [(s.name, s.target) for s in z.symlinks] == [("dangling", "../outside/../nowhere")]


def test_special_file_is_rejected_naming_it(tmp_path: Path) -> None:
    make_sample(tmp_path / "t")
    os.mkfifo(tmp_path / "t" / "z" / "pipe")
    with pytest.raises(InvalidArgument) as info:
        build_tree(tmp_path / "t")
    assert str(tmp_path / "t" / "z" / "pipe") in str(info.value)


def test_non_utf8_name_is_rejected_naming_it(tmp_path: Path) -> None:
    make_sample(tmp_path / "t")
    fd = os.open(os.fsencode(tmp_path / "t") + b"/bad-\xff.bin", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    with pytest.raises(InvalidArgument) as info:
        build_tree(tmp_path / "t")
    assert "bad-" in str(info.value)
    assert "UTF-8" in str(info.value)


def test_same_tree_same_digest(tmp_path: Path) -> None:
    """Twice, and in a copy made elsewhere at another time: only content, names, the
    executable bit and symlink targets count (not mtimes, inodes or paths)."""
    make_sample(tmp_path / "t")
    first = build_tree(tmp_path / "t")
    assert build_tree(tmp_path / "t").root == first.root
    shutil.copytree(tmp_path / "t", tmp_path / "copy", symlinks=True)
    os.utime(tmp_path / "copy" / "b.txt", (0, 0))
    assert build_tree(tmp_path / "copy").root == first.root
    blake = build_tree(tmp_path / "t", DigestFunction.BLAKE3)
    assert blake.root.function is DigestFunction.BLAKE3
    assert blake.root.hash != first.root.hash
    assert build_tree(tmp_path / "copy", DigestFunction.BLAKE3).root == blake.root


def test_duplicate_contents_stored_once(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    for name in ("one", "two", "three"):
        (root / name).write_bytes(b"same")
    build = build_tree(root)
    assert build.file_count == 3
    assert list(build.files) == [Digest.of(b"same")]


# -- completeness ----------------------------------------------------------------------------


def _blobs(build) -> list[tuple[Digest, bytes]]:
    """Every blob of a built tree, ready to store."""
    return [*build.directories.items(), *((d, Path(p).read_bytes()) for d, p in build.files.items())]


async def _store(blobs: list[tuple[Digest, bytes]], storage: MemoryStorage) -> None:
    for digest, data in blobs:
        await storage.write_bytes(digest, data)


def test_missing_in_tree_and_complete_trees(tmp_path: Path) -> None:
    """A tree remembered as complete is still re-checked: an evicted file is noticed at once,
    and one storage's complete tree says nothing about another storage."""
    make_sample(tmp_path / "t")
    build = build_tree(tmp_path / "t")
    blobs = _blobs(build)
    inner = Digest.of(b"inner\n")

    async def scenario() -> None:
        full, other = MemoryStorage(), MemoryStorage()
        await _store(blobs, full)
        await _store(blobs, other)
        await other.delete([inner])
        trees = CompleteTrees()
        assert await missing_in_tree(full, build.root) == []
        assert await trees.missing(full, build.root) == []
        assert await trees.missing(other, build.root) == [inner]
        await full.delete([inner])
        assert await trees.missing(full, build.root) == [inner]
        await full.write_bytes(inner, b"inner\n")
        assert await trees.missing(full, build.root) == []
        # A missing subdirectory is reported, not an error.
        z = next(d for d, data in build.directories.items() if b"inner.txt" in data)
        await full.delete([z])
        assert await missing_in_tree(full, build.root) == [z]
        # A blob that is not a Directory is an error, not a missing tree.
        junk = Digest.of(b"\xff\xff junk")
        await full.write_bytes(junk, b"\xff\xff junk")
        with pytest.raises(InvalidArgument):
            await missing_in_tree(full, junk)

    asyncio.run(scenario())
