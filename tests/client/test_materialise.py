"""The tree materialiser on a real file system: hostile names and symlinks are refused
before anything is written, nothing outside the destination is ever touched (whatever
the destination holds, even when it changes under a running checkout), and a failed run
leaves nothing behind.  The property test feeds it arbitrary trees and destinations."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casbah.client.materialise import Materialiser, UnsafeTree, plan_tree
from casbah.digest import Digest
from casbah.errors import CasbahError, FailedPrecondition, InvalidArgument
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2


class Store:
    """Directory messages and file contents by digest, as a cache or a server holds them."""

    def __init__(self) -> None:
        self.blobs: dict[Digest, bytes] = {}

    def put(self, data: bytes) -> Digest:
        digest = Digest.of(data)
        self.blobs[digest] = data
        return digest

    def directory(self, digest: Digest) -> re_pb2.Directory:
        return re_pb2.Directory.FromString(self.blobs[digest])

    def tree(self, spec: dict) -> Digest:
        """`{name: bytes | ("x", bytes) | ("->", target) | {…}}` -> root digest (names unsorted
        on purpose: a hostile tree need not follow REAPI's ordering)."""
        d = re_pb2.Directory()
        for name, value in spec.items():
            if isinstance(value, dict):
                child = self.tree(value)
                d.directories.add(name=name, digest=re_pb2.Digest(hash=child.hash, size_bytes=child.size))
            elif isinstance(value, tuple) and value[0] == "->":
                d.symlinks.add(name=name, target=value[1])
            else:
                executable, data = (True, value[1]) if isinstance(value, tuple) else (False, value)
                blob = self.put(data)
                d.files.add(name=name, digest=re_pb2.Digest(hash=blob.hash, size_bytes=blob.size),
                            is_executable=executable)
        return self.put(d.SerializeToString())

    def write(self, root: Digest, dest: Path, allow_external_symlinks: bool = False,
              must_be_empty: bool = True, before_files=None) -> None:
        plan = plan_tree(root, self.directory, allow_external_symlinks)
        with Materialiser(plan, dest, must_be_empty=must_be_empty) as out:
            if before_files is not None:
                before_files()
            for index, name, digest, executable in plan.files:
                fd = out.new_file(index, name, 0o755 if executable else 0o644)
                try:
                    os.write(fd, self.blobs[digest] if digest.size else b"")
                finally:
                    os.close(fd)


def snapshot(top: Path) -> dict[str, tuple]:
    """Every path under `top` (links not followed) with its kind, mode, link target, bytes."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            st_ = full.lstat()
            if stat.S_ISLNK(st_.st_mode):
                out[str(full.relative_to(top))] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                out[str(full.relative_to(top))] = ("dir", stat.S_IMODE(st_.st_mode))
            else:
                out[str(full.relative_to(top))] = ("file", stat.S_IMODE(st_.st_mode), full.read_bytes())
    return out


def test_a_good_tree_is_written_with_modes_and_links(tmp_path: Path) -> None:
    store = Store()
    root = store.tree({"a": b"A", "run": ("x", b"#!/bin/sh\n"), "e": b"",
                       "sub": {"deep": {"f": b"F"}, "up": ("->", "../a")}, "empty": {}})
    store.write(root, tmp_path / "new" / "out")
    got = snapshot(tmp_path / "new" / "out")
    assert got["a"] == ("file", 0o644, b"A")
    assert got["run"] == ("file", 0o755, b"#!/bin/sh\n")
    assert got["e"] == ("file", 0o644, b"")
    assert got["sub/deep/f"] == ("file", 0o644, b"F")
    assert got["sub/up"] == ("link", "../a")
    assert got["empty"][0] == "dir"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../../../../victim.txt", "nul\0byte", "/abs"])
@pytest.mark.parametrize("kind", ["file", "dir", "symlink"])
def test_bad_names_are_refused_before_anything_is_written(tmp_path: Path, kind: str, name: str) -> None:
    store = Store()
    entry = {"file": b"evil", "dir": {"x": b"x"}, "symlink": ("->", "a")}[kind]
    root = store.tree({"a": b"first", "ok": {"b": b"b"}, "nested": {name: entry}})
    dest = tmp_path / "dest"
    with pytest.raises(UnsafeTree) as info:
        store.write(root, dest)
    assert repr(f"nested/{name}") in str(info.value)
    assert not dest.exists(), "nothing may be written for a bad tree, not even the destination"
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    store = Store()
    d = re_pb2.Directory()
    blob = store.put(b"x")
    d.files.add(name="same", digest=re_pb2.Digest(hash=blob.hash, size_bytes=blob.size))
    d.symlinks.add(name="same", target="/etc/passwd")
    root = store.put(d.SerializeToString())
    with pytest.raises(UnsafeTree, match="'same' appears twice"):
        store.write(root, tmp_path / "dest", allow_external_symlinks=True)
    assert not (tmp_path / "dest").exists()


@pytest.mark.parametrize(("links", "bad"), [
    ({"etc": ("->", "/etc")}, "etc"),
    ({"up": ("->", "../../../..")}, "up"),
    ({"d": {"up": ("->", "../..")}}, "d/up"),
    ({"d": {"missing": ("->", "nothere/../../..")}}, "d/missing"),
    # each stays inside on its own; together they leave: d/l is the root, so m is its parent
    ({"d": {"l": ("->", "..")}, "m": ("->", "d/l/..")}, "m"),
    ({"a": ("->", "b"), "b": ("->", "a")}, "a"),  # a loop never resolves inside the tree
])
def test_symlinks_leaving_the_tree_are_refused_unless_allowed(tmp_path: Path, links: dict, bad: str) -> None:
    store = Store()
    root = store.tree({"f": b"f", **links})
    with pytest.raises(UnsafeTree) as info:
        store.write(root, tmp_path / "refused")
    assert repr(bad) in str(info.value)
    assert "--allow-external-symlinks" in str(info.value)
    assert not (tmp_path / "refused").exists()
    store.write(root, tmp_path / "allowed", allow_external_symlinks=True)
    assert os.path.islink(tmp_path / "allowed" / bad)


def test_symlinks_inside_the_tree_are_written(tmp_path: Path) -> None:
    store = Store()
    root = store.tree({"f": b"f", "d": {"e": {"l": ("->", "../../f"), "self": ("->", "."), "dangling": ("->", "x/y")}},
                       "to-d": ("->", "d/e/")})
    store.write(root, tmp_path / "out")
    assert os.readlink(tmp_path / "out" / "d" / "e" / "l") == "../../f"
    assert (tmp_path / "out" / "d" / "e" / "l").read_bytes() == b"f"


def test_existing_entries_are_never_followed_or_replaced(tmp_path: Path) -> None:
    """Content at the tree's paths (here left by someone else, must_be_empty=False as if it
    appeared after the emptiness check): the run stops naming the path; outside untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("precious")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)
    store = Store()
    root = store.tree({"a": b"a", "sub": {"victim": b"EVIL", "new": b"EVIL"}})
    with pytest.raises(FailedPrecondition, match="dest/sub exists already"):
        store.write(root, dest, must_be_empty=False)
    assert snapshot(outside) == {"victim": ("file", 0o644, b"precious")}
    assert sorted(os.listdir(dest)) == ["sub"], "what the run created is removed; the planted link stays"


def test_a_directory_swapped_for_a_link_mid_run_is_not_followed(tmp_path: Path) -> None:
    """The race a path-based writer loses: after the directories exist and before the
    files are written, a directory is moved away and replaced by a symlink to elsewhere.
    Writes go on through the directory's fd, so they land in the directory this run
    created (wherever it was moved), never through the link."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    store = Store()
    root = store.tree({"sub": {"deep": {"payload": b"EVIL"}}})

    def swap() -> None:
        os.rename(dest / "sub", tmp_path / "moved")
        (dest / "sub").symlink_to(outside)

    store.write(root, dest, before_files=swap)
    assert list(outside.iterdir()) == []
    assert (tmp_path / "moved" / "deep" / "payload").read_bytes() == b"EVIL"


def test_components_below_within_are_not_followed(tmp_path: Path) -> None:
    """fetch-all's DEST/<directory>: a link planted at <directory> in DEST is not followed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    top = tmp_path / "top"
    top.mkdir()
    (top / "pre").symlink_to(outside)
    store = Store()
    plan = plan_tree(store.tree({"f": b"f"}), store.directory)
    with pytest.raises(InvalidArgument, match="pre is not a directory"), Materialiser(plan, top / "pre" / "src",
                                                                                      within=top):
        pass
    assert list(outside.iterdir()) == []
    with Materialiser(plan, top / "new" / "src", within=top) as out:
        os.close(out.new_file(0, "f", 0o644))
    assert (top / "new" / "src" / "f").is_file()


def test_a_failure_midway_removes_everything_the_run_created(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    store = Store()
    root = store.tree({"a": {"b": b"b"}, "c": b"c", "l": ("->", "c")})
    plan = plan_tree(root, store.directory)
    with pytest.raises(RuntimeError), Materialiser(plan, dest) as out:
        os.close(out.new_file(*plan.files[0][:2], 0o644))
        raise RuntimeError("download failed")
    assert dest.is_dir() and list(dest.iterdir()) == [], "the user's own destination stays, emptied"


# -- property: nothing outside the destination ever changes ---------------------------

_NAMES = st.sampled_from(["a", "b", "sub", "x.txt", "..", ".", "", "a/b", "../victim", "/etc", "n\0l", "sentinel"])
_TARGETS = st.sampled_from(["a", "../a", "../..", "/", "/etc", "sub/../..", "x/../../y", ".", "", "../sentinel",
                            "../sentinel/dir", "a/../../sentinel/file"])
_TREES = st.recursive(
    st.one_of(st.binary(max_size=8), st.tuples(st.just("->"), _TARGETS),
              st.tuples(st.just("x"), st.binary(max_size=4))),
    lambda children: st.dictionaries(_NAMES, children, max_size=4),
    max_leaves=12,
).filter(lambda t: isinstance(t, dict))
#: What the destination holds beforehand: name -> file, directory, or a link into the sentinel.
_PRESENT = st.dictionaries(_NAMES.filter(lambda n: n not in ("", ".", "..") and "/" not in n and "\0" not in n),
                           st.sampled_from(["file", "dir", "link-dir", "link-file", "link-dangling"]), max_size=4)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=_TREES, present=_PRESENT, allow=st.booleans())
def test_property_nothing_outside_the_destination_changes(tmp_path_factory, tree: dict, present: dict,
                                                          allow: bool) -> None:
    base = tmp_path_factory.mktemp("prop")
    sentinel = base / "sentinel"
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "file").write_text("keep")
    (sentinel / "dir" / "inner").write_text("keep too")
    dest = base / "dest"
    dest.mkdir()
    for name, kind in present.items():
        path = dest / name
        if kind == "file":
            path.write_text("old")
        elif kind == "dir":
            path.mkdir()
        else:
            path.symlink_to({"link-dir": sentinel / "dir", "link-file": sentinel / "file",
                             "link-dangling": sentinel / "new"}[kind])
    before = snapshot(sentinel)
    siblings = sorted(os.listdir(base))
    store = Store()
    try:
        store.write(store.tree(tree), dest, allow_external_symlinks=allow, must_be_empty=False)
    except CasbahError:
        pass
    assert snapshot(sentinel) == before
    assert sorted(os.listdir(base)) == siblings
