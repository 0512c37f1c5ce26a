"""`casbah cache …`: every command, its output and its error paths, on small trees.

Commands run in-process through click (real gRPC to a real `casbah serve` where a
remote is involved); the round trips of a big tree as separate processes are in
test_cache_roundtrip.py.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from client_helpers import assert_same_tree, cli, object_files, small_tree, start_module_server

from casbah.client.remote import RemoteClient
from casbah.digest import Digest
from casbah.local import LocalCache
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.reapi.channel import RemoteSpec


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One server for the module (shadows the per-test one from tests/conftest.py)."""
    process, stop = start_module_server(request, tmp_path_factory)
    yield process
    stop()


DIGEST = re.compile(r"^[0-9a-f]{64}/\d+$")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def commit(cache_dir: Path, tree: Path, ref: str | None = None) -> str:
    args = ["cache", "commit", "--cache-dir", str(cache_dir), str(tree)]
    if ref:
        args += ["--ref", ref]
    out = cli(*args).stdout.strip()
    assert DIGEST.match(out), out
    return out


def test_commit_checkout_and_cache_dir_from_environment(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "a")
    (tree / "empty").write_bytes(b"")
    (tree / "empty-dir").mkdir()
    env = {"CASBAH_CACHE_DIR": str(cache_dir)}
    root = cli("cache", "commit", str(tree), "--ref", "a", env=env).stdout.strip()
    assert (cache_dir / "refs" / "a").read_text().strip() == root
    out = tmp_path / "out"
    result = cli("cache", "checkout", "--link", "a", str(out), env=env)
    assert "checked out 5 files" in result.stderr
    assert_same_tree(tree, out, exact_modes=False)  # --link: the cache's read-only objects
    # A checkout by digest works the same, and by default gives ordinary writable files.
    copy = tmp_path / "copy"
    cli("cache", "checkout", root, str(copy), env=env)
    assert_same_tree(tree, copy, exact_modes=True)
    (copy / "README").write_text("changed\n")  # writable, and the cache is unaffected
    assert LocalCache(cache_dir).fsck().clean


def test_commit_link_makes_files_the_objects(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "link")
    cli("cache", "commit", "--cache-dir", str(cache_dir), "--link", str(tree), "--ref", "l")
    readme = tree / "README"
    digest = LocalCache(cache_dir).add_bytes(b"read me\n")
    obj = LocalCache(cache_dir).object_path(digest)
    assert os.path.samefile(readme, obj)  # linked, not copied
    assert readme.stat().st_mode & 0o222 == 0  # and made read-only
    # An executable is copied instead: the object must not carry an executable mode.
    run_digest = Digest.of((tree / "run.sh").read_bytes())
    run_obj = LocalCache(cache_dir).object_path(run_digest)
    assert not os.path.samefile(tree / "run.sh", run_obj)
    assert run_obj.stat().st_mode & 0o111 == 0
    assert os.access(tree / "run.sh", os.X_OK)
    out = tmp_path / "out"
    cli("cache", "checkout", "--cache-dir", str(cache_dir), "--link", "l", str(out))
    assert_same_tree(tree, out, exact_modes=False)


def test_recommit_writes_nothing(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "same")
    big = tree / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))  # above the whole-file read size: hashed, then copied
    root = commit(cache_dir, tree, "r")
    before = object_files(cache_dir)
    tmp_before = sorted(os.listdir(cache_dir / "tmp"))
    time.sleep(0.01)
    assert commit(cache_dir, tree, "r") == root
    assert object_files(cache_dir) == before
    assert sorted(os.listdir(cache_dir / "tmp")) == tmp_before


def test_unknown_ref_is_a_clear_error(cache_dir: Path, tmp_path: Path) -> None:
    for args in (["checkout", "nope", str(tmp_path / "out")], ["diff", "nope", "nope2"], ["rm", "nope"],
                 ["push", "--remote", "grpc://127.0.0.1:1", "nope"]):
        result = cli("cache", *args[:1], "--cache-dir", str(cache_dir), *args[1:], expect=1)
        assert "no ref 'nope'" in result.stderr, result
        assert "Traceback" not in result.stderr


def test_special_file_is_refused_by_name(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "fifo")
    fifo = tree / "src" / "pipe"
    os.mkfifo(fifo)
    result = cli("cache", "commit", "--cache-dir", str(cache_dir), str(tree), "--ref", "f", expect=1)
    assert str(fifo) in result.stderr
    assert "special file" in result.stderr
    assert not (cache_dir / "refs" / "f").exists()


def test_checkout_into_non_empty_directory_is_refused(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "x")
    commit(cache_dir, tree, "x")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep").write_text("mine\n")
    result = cli("cache", "checkout", "--cache-dir", str(cache_dir), "x", str(dest), expect=1)
    assert "not empty" in result.stderr
    assert sorted(os.listdir(dest)) == ["keep"]
    afile = tmp_path / "afile"
    afile.write_text("")
    result = cli("cache", "checkout", "--cache-dir", str(cache_dir), "x", str(afile), expect=2)
    assert "is a file" in result.stderr


def test_checkout_of_an_incomplete_tree_writes_nothing(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "gone")
    commit(cache_dir, tree, "g")
    cache = LocalCache(cache_dir)
    obj = cache.object_path(Digest.of((tree / "README").read_bytes()))
    obj.unlink()
    dest = tmp_path / "dest"
    result = cli("cache", "checkout", "--cache-dir", str(cache_dir), "g", str(dest), expect=1)
    assert "missing" in result.stderr
    assert not dest.exists(), "not even the destination is created"
    fsck = cli("cache", "fsck", "--cache-dir", str(cache_dir), expect=1)
    assert "incomplete: ref g lacks 1 objects" in fsck.stdout


def test_diff_reports_added_removed_modified(tmp_path: Path, cache_dir: Path) -> None:
    a = small_tree(tmp_path / "a", "one")
    b = small_tree(tmp_path / "b", "one")
    (b / "README").write_text("changed\n")  # M
    (b / "src" / "pkg" / "util.h").unlink()  # D
    (b / "src" / "pkg" / "new.h").write_text("new\n")  # A
    (b / "docs").mkdir()
    (b / "docs" / "guide.md").write_text("guide\n")  # A, inside a new directory
    (b / "run.sh").chmod(0o644)  # M: the executable bit is content
    (b / "latest").unlink()
    (b / "latest").symlink_to("README")  # M: another target
    commit(cache_dir, a, "a")
    commit(cache_dir, b, "b")
    out = cli("cache", "diff", "--cache-dir", str(cache_dir), "a", "b").stdout.splitlines()
    assert out == ["A docs/guide.md", "A src/pkg/new.h", "D src/pkg/util.h", "M README", "M latest", "M run.sh"]
    reverse = cli("cache", "diff", "--cache-dir", str(cache_dir), "b", "a").stdout.splitlines()
    assert reverse == ["A src/pkg/util.h", "D docs/guide.md", "D src/pkg/new.h", "M README", "M latest",
                       "M run.sh"]
    assert cli("cache", "diff", "--cache-dir", str(cache_dir), "a", "a").stdout == ""


def test_ls_orders_by_last_use_and_rm_removes(tmp_path: Path, cache_dir: Path) -> None:
    for i, name in enumerate(["first", "group/second", "third"]):
        commit(cache_dir, small_tree(tmp_path / f"t{i}", name), name)
        os.utime(cache_dir / "refs" / name, (1_000_000 + i, 1_000_000 + i))

    def names() -> list[str]:
        return [line.split()[-1] for line in cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout.splitlines()]

    assert names() == ["third", "group/second", "first"]
    cli("cache", "checkout", "--cache-dir", str(cache_dir), "first", str(tmp_path / "out"))  # a use
    assert names() == ["first", "third", "group/second"]
    line = cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout.splitlines()[0]
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  [0-9a-f]{64}/\d+  first$", line), line
    cli("cache", "rm", "--cache-dir", str(cache_dir), "group/second", "third")
    assert names() == ["first"]
    assert not (cache_dir / "refs" / "group").exists()
    result = cli("cache", "rm", "--cache-dir", str(cache_dir), "third", expect=1)
    assert "no ref 'third'" in result.stderr
    result = cli("cache", "rm", "--cache-dir", str(cache_dir), "../escape", expect=1)
    assert "invalid ref name" in result.stderr


def test_prune_keeps_referenced_objects_only(tmp_path: Path, cache_dir: Path) -> None:
    keep = small_tree(tmp_path / "keep", "keep")
    drop = small_tree(tmp_path / "drop", "drop")
    commit(cache_dir, keep, "keep")
    commit(cache_dir, drop, "drop")
    both = object_files(cache_dir)
    cli("cache", "rm", "--cache-dir", str(cache_dir), "drop")
    out = cli("cache", "prune", "--cache-dir", str(cache_dir)).stdout
    left = object_files(cache_dir)
    removed = len(both) - len(left)
    assert removed > 0
    assert f"removed {removed} objects" in out
    cache = LocalCache(cache_dir)
    assert not cache.missing(cache.tree_digests(cache.resolve("keep")))
    assert cli("cache", "prune", "--cache-dir", str(cache_dir)).stdout.startswith("removed 0 objects")
    out_dir = tmp_path / "out"
    cli("cache", "checkout", "--cache-dir", str(cache_dir), "keep", str(out_dir))
    assert_same_tree(keep, out_dir, exact_modes=True)


def test_gc_evicts_least_recently_used_refs(tmp_path: Path, cache_dir: Path) -> None:
    sizes = {}
    for i, name in enumerate(["old", "middle", "new"]):
        tree = tmp_path / name
        tree.mkdir()
        (tree / "data.bin").write_bytes(os.urandom(100_000))
        commit(cache_dir, tree, name)
        os.utime(cache_dir / "refs" / name, (1_000_000 + i, 1_000_000 + i))
        sizes[name] = 100_000
    # "old" is used now: "middle" becomes the least recently used.
    cli("cache", "checkout", "--cache-dir", str(cache_dir), "old", str(tmp_path / "out"))
    out = cli("cache", "gc", "--cache-dir", str(cache_dir), "--quota", "250K").stdout
    assert "removed ref middle\n" in out and "removed 1 ref," in out
    remaining = [line.split()[-1] for line in cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout.splitlines()]
    assert remaining == ["old", "new"]
    assert LocalCache(cache_dir).size() <= 250 * 1024
    out = cli("cache", "gc", "--cache-dir", str(cache_dir), "--quota", "1").stdout
    assert "removed ref old\n" in out and "removed ref new\n" in out
    assert cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout == ""
    assert object_files(cache_dir) == {}
    bad = cli("cache", "gc", "--cache-dir", str(cache_dir), "--quota", "lots", expect=2)
    assert "Invalid value for '--quota'" in bad.stderr and "not a size" in bad.stderr


def test_fsck_removes_a_corrupt_object(tmp_path: Path, cache_dir: Path) -> None:
    tree = small_tree(tmp_path / "tree", "fsck")
    commit(cache_dir, tree, "f")
    assert cli("cache", "fsck", "--cache-dir", str(cache_dir)).stdout == ""
    digest = Digest.of((tree / "README").read_bytes())
    obj = LocalCache(cache_dir).object_path(digest)
    assert obj.stat().st_mode & 0o222 == 0  # objects are read-only
    obj.chmod(0o644)
    obj.write_bytes(b"bit rot\n")
    result = cli("cache", "fsck", "--cache-dir", str(cache_dir), expect=1)
    assert f"corrupt: {digest} (removed)" in result.stdout
    assert "incomplete: ref f lacks 1 objects" in result.stdout
    assert not obj.exists()
    # Committing the tree again repairs it.
    commit(cache_dir, tree, "f")
    assert cli("cache", "fsck", "--cache-dir", str(cache_dir)).stdout == ""


def test_push_pull_and_errors_against_casbah(tmp_path: Path, cache_dir: Path, server) -> None:
    tree = small_tree(tmp_path / "tree", "remote")
    root = commit(cache_dir, tree, "rel/1.0")
    remote = ["--remote", server.url]
    pushed = cli("cache", "push", "--cache-dir", str(cache_dir), *remote, "rel/1.0")
    assert pushed.stdout.strip() == root
    assert re.search(r"transferred \d+ blobs", pushed.stderr)
    # ReferenceStorage publishing, and the CASBAH_REMOTE environment variable.
    cli("cache", "push", "--cache-dir", str(cache_dir), "--publish", "references", "rel/1.0",
        env={"CASBAH_REMOTE": server.url})

    other = tmp_path / "other-cache"
    for publish in ("asset", "references"):
        pulled = cli("cache", "pull", "--cache-dir", str(other), *remote, "--publish", publish, "rel/1.0")
        assert pulled.stdout.strip() == root
    out = tmp_path / "out"
    cli("cache", "checkout", "--cache-dir", str(other), "rel/1.0", str(out))
    assert_same_tree(tree, out, exact_modes=True)

    missing = cli("cache", "pull", "--cache-dir", str(other), *remote, "no/such/ref", expect=1)
    assert "has no ref 'no/such/ref'" in missing.stderr
    absent = "0" * 64 + "/42"
    gone = cli("cache", "pull", "--cache-dir", str(other), *remote, absent, expect=1)
    assert "not found" in gone.stderr and "Traceback" not in gone.stderr
    down = cli("cache", "push", "--cache-dir", str(cache_dir), "--remote", "grpc://127.0.0.1:1", "rel/1.0",
               expect=1)
    assert "UNAVAILABLE" in down.stderr or "unavailable" in down.stderr.lower()
    bad_url = cli("cache", "pull", "--cache-dir", str(other), "--remote", "http2://x", "rel/1.0", expect=1)
    assert "grpc://" in bad_url.stderr


def test_push_with_a_missing_local_object_names_it(tmp_path: Path, cache_dir: Path, server) -> None:
    tree = small_tree(tmp_path / "tree", "hole")
    (tree / "unique.txt").write_bytes(os.urandom(64))  # never on the server
    commit(cache_dir, tree, "h")
    digest = Digest.of((tree / "unique.txt").read_bytes())
    LocalCache(cache_dir).object_path(digest).unlink()
    result = cli("cache", "push", "--cache-dir", str(cache_dir), "--remote", server.url, "h", expect=1)
    assert str(digest) in result.stderr
    assert "fsck" in result.stderr


def test_pull_with_checkout(tmp_path: Path, cache_dir: Path, server) -> None:
    tree = small_tree(tmp_path / "tree", "pull-checkout")
    root = commit(cache_dir, tree, "pc")
    cli("cache", "push", "--cache-dir", str(cache_dir), "--remote", server.url, "pc")
    other = tmp_path / "other"
    dest = tmp_path / "dest"
    result = cli("cache", "pull", "--cache-dir", str(other), "--remote", server.url, "pc", "--checkout", str(dest))
    assert result.stdout.strip() == root
    assert "checked out 4 files" in result.stderr
    assert_same_tree(tree, dest, exact_modes=True)
    # A non-empty target is refused before anything is downloaded.
    third = tmp_path / "third"
    refused = cli("cache", "pull", "--cache-dir", str(third), "--remote", server.url, "pc", "--checkout", str(dest),
                  expect=1)
    assert "not empty" in refused.stderr
    assert not (third / "refs" / "pc").exists()


def test_pull_of_a_tree_incomplete_on_the_server_fails(tmp_path: Path, cache_dir: Path, server) -> None:
    """GetTree silently leaves out subtrees the server lacks: pull must notice, not name a partial tree."""
    child = re_pb2.Directory(files=[re_pb2.FileNode(name="f", digest=Digest.of(b"f\n").to_proto())])
    child_blob = child.SerializeToString(deterministic=True)
    child_digest = Digest.of(child_blob)
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="sub", digest=child_digest.to_proto())])
    root_blob = root.SerializeToString(deterministic=True)
    root_digest = Digest.of(root_blob)
    with RemoteClient(RemoteSpec(server.url)) as client:
        client.upload({root_digest: root_blob})  # the child Directory is never uploaded
    result = cli("cache", "pull", "--cache-dir", str(cache_dir), "--remote", server.url, str(root_digest),
                 expect=1)
    assert str(child_digest) in result.stderr
    assert object_files(cache_dir) == {}  # nothing of the partial tree was stored


def test_file_system_errors_are_one_clean_line(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "plain-file"
    not_a_dir.write_text("")
    tree = small_tree(tmp_path / "tree", "fs")
    result = cli("cache", "commit", "--cache-dir", str(not_a_dir), str(tree), expect=1)
    assert str(not_a_dir) in result.stderr
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
