"""The REAPI name and order rules as pure functions (no server)."""

from __future__ import annotations

import pytest

from casbah.digest import Digest, DigestFunction
from casbah.errors import InvalidTree
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree import check_tree_message
from casbah.tree_rules import check_directory, directory_problem, echo, name_problem, output_path_problem


def files(*names: str) -> re_pb2.Directory:
    return re_pb2.Directory(files=[re_pb2.FileNode(name=n) for n in names])


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/", "../../x", "x\0y"])
def test_bad_names(name: str) -> None:
    assert name_problem(name) is not None
    assert directory_problem(files(name)) is not None


@pytest.mark.parametrize("name", ["...", "..x", ".hidden", "a b", "a\\b", "\U0001f600", "x" * 300])
def test_good_names(name: str) -> None:
    assert name_problem(name) is None


def test_order_is_by_utf8_bytes_per_list_and_names_are_unique_across_lists() -> None:
    assert directory_problem(files("a", "b", "c")) is None
    assert directory_problem(files("b", "a")) == ("a", "file entries are not sorted by name "
                                                        "(the REAPI requires code point order)")
    # Code point order: U+FF61 sorts before U+1F600 (UTF-16 code units would say the opposite).
    assert directory_problem(files("\uff61", "\U0001f600")) is None
    assert directory_problem(files("\U0001f600", "\uff61")) is not None
    assert directory_problem(files("x", "x"))[0] == "x"
    # Each list is sorted on its own: a directory may sort before a file.
    mixed = re_pb2.Directory(files=[re_pb2.FileNode(name="z")], directories=[re_pb2.DirectoryNode(name="a")],
                             symlinks=[re_pb2.SymlinkNode(name="m", target="/abs/../ok")])
    assert directory_problem(mixed) is None
    clash = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name="m")], symlinks=[re_pb2.SymlinkNode(name="m")])
    assert directory_problem(clash) == ("m", "symlink name is used twice in the directory")


def test_check_directory_names_path_and_digest() -> None:
    with pytest.raises(InvalidTree) as info:
        check_directory(files("ok", "x\0y"), "deep/sub", "abc/12")
    assert "'deep/sub/x\\x00y'" in str(info.value) and "abc/12" in str(info.value)


def test_echo_is_bounded() -> None:
    assert len(echo("a" * 10_000)) < 210
    assert echo("x\0y") == "'x\\x00y'"


@pytest.mark.parametrize(("path", "ok"), [
    ("a", True), ("a/b/c.o", True), ("./a", True), ("a..b/c", True),
    ("", False), ("/a", False), ("a/", False), ("a//b", False), ("../a", False), ("a/../../b", False),
    ("a\0b", False),
])
def test_output_paths(path: str, ok: bool) -> None:
    assert (output_path_problem(path) is None) is ok


def test_output_directory_may_be_the_working_directory() -> None:
    assert output_path_problem("", allow_empty=True) is None


def test_tree_message_children_are_named_by_path() -> None:
    bad = files("..")
    bad_data = bad.SerializeToString(deterministic=True)
    bad_digest = Digest.of(bad_data, DigestFunction.SHA256)
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(
        name="out", digest=re_pb2.Digest(hash=bad_digest.hash, size_bytes=bad_digest.size))])
    tree = re_pb2.Tree(root=root, children=[bad])
    tree_digest = Digest.of(tree.SerializeToString(), DigestFunction.SHA256)
    with pytest.raises(InvalidTree) as info:
        check_tree_message(tree, tree_digest)
    assert "'out/..'" in str(info.value) and bad_digest.hash in str(info.value)
    # A child nothing points at is still checked.
    with pytest.raises(InvalidTree, match=r"children\[0\]"):
        check_tree_message(re_pb2.Tree(root=re_pb2.Directory(), children=[bad]), tree_digest)
    check_tree_message(re_pb2.Tree(root=root, children=[files("fine")]), tree_digest)  # unreached but valid
