"""The server refuses to vouch for trees with hostile names, over real gRPC.

Every entry point that stores a tree (PushDirectory, UpdateReference,
UpdateActionResult) answers INVALID_ARGUMENT naming the entry and stores
nothing; every one that serves a stored tree (GetTree, FetchDirectory) answers
FAILED_PRECONDITION naming the entry and hands out no bad Directory.  Valid
trees, including BuildStream's (the empty Directory named but never uploaded),
still pass.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from server_test_helpers import ac, cas, rand, rpc_error, sha, upload

from casbah.assets.index import AssetKind, AssetRecord
from casbah.assets.sqlite import SqliteAssetIndex
from casbah.digest import Digest, DigestFunction
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.tree_rules import echo

EMPTY = sha(b"")
INVALID = grpc.StatusCode.INVALID_ARGUMENT
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
HOSTILE_NAMES = ["../../x", "a/b", "", ".", "..", "x\0y"]


def f(name: str) -> re_pb2.FileNode:
    return re_pb2.FileNode(name=name, digest=EMPTY)  # the empty blob: present without upload


def d(name: str, digest: re_pb2.Digest = EMPTY) -> re_pb2.DirectoryNode:
    return re_pb2.DirectoryNode(name=name, digest=digest)


def s(name: str, target: str = "t") -> re_pb2.SymlinkNode:
    return re_pb2.SymlinkNode(name=name, target=target)


def bad_directories() -> list[tuple[str, re_pb2.Directory, str]]:
    """(case id, Directory, the name the error must point at)."""
    cases = [(f"file {n!r}", re_pb2.Directory(files=[f(n)]), n) for n in HOSTILE_NAMES]
    cases += [
        ("directory '..'", re_pb2.Directory(directories=[d("..")]), ".."),
        ("symlink 'a/b'", re_pb2.Directory(symlinks=[s("a/b")]), "a/b"),
        ("files out of order", re_pb2.Directory(files=[f("b"), f("a")]), "a"),
        ("directories out of order", re_pb2.Directory(directories=[d("z"), d("y")]), "y"),
        ("duplicate file", re_pb2.Directory(files=[f("x"), f("x")]), "x"),
        ("file and directory share a name", re_pb2.Directory(files=[f("x")], directories=[d("x")]), "x"),
        ("file and symlink share a name", re_pb2.Directory(files=[f("x")], symlinks=[s("x")]), "x"),
    ]
    return cases


CASES = bad_directories()
IDS = [c[0] for c in CASES]


def data(message) -> bytes:
    return message.SerializeToString(deterministic=True)


def plant(channel: grpc.Channel, bad: re_pb2.Directory) -> tuple[re_pb2.Digest, re_pb2.Digest]:
    """Store `bad` as `sub/` of a fresh valid root, through plain CAS (which takes any blob).

    Returns (root digest, bad directory digest)."""
    bad_digest = sha(data(bad))
    root = re_pb2.Directory(files=[f(f"salt-{uuid.uuid4().hex}")], directories=[d("sub", bad_digest)])
    upload(channel, [data(bad), data(root)])
    return sha(data(root)), bad_digest


def assert_names(error_details: str, path: str, digest: re_pb2.Digest) -> None:
    assert echo(path) in error_details, error_details
    assert digest.hash in error_details, error_details


def uri() -> str:
    return f"https://example.com/{uuid.uuid4()}.tar.gz"


def push_dir(channel: grpc.Channel, name: str, root: re_pb2.Digest, **kw) -> ra_pb2.PushDirectoryResponse:
    return ra_grpc.PushStub(channel).PushDirectory(
        ra_pb2.PushDirectoryRequest(uris=[name], root_directory_digest=root, **kw), timeout=30)


def fetch_dir(channel: grpc.Channel, name: str) -> ra_pb2.FetchDirectoryResponse:
    return ra_grpc.FetchStub(channel).FetchDirectory(ra_pb2.FetchDirectoryRequest(uris=[name]), timeout=30)


def put_result(channel: grpc.Channel, result: re_pb2.ActionResult,
               action: re_pb2.Digest | None = None) -> re_pb2.ActionResult:
    action = action or sha(rand(32))
    return ac(channel).UpdateActionResult(
        re_pb2.UpdateActionResultRequest(action_digest=action, action_result=result), timeout=30)


def get_result(channel: grpc.Channel, action: re_pb2.Digest) -> re_pb2.ActionResult:
    return ac(channel).GetActionResult(re_pb2.GetActionResultRequest(action_digest=action), timeout=30)


@pytest.mark.parametrize(("case", "bad", "name"), CASES, ids=IDS)
def test_push_directory_refuses_bad_names(mchannel, case: str, bad: re_pb2.Directory, name: str) -> None:
    root, bad_digest = plant(mchannel, bad)
    asset = uri()
    error = rpc_error(lambda: push_dir(mchannel, asset, root))
    assert error.code() == INVALID, error.details()
    assert_names(error.details(), f"sub/{name}", bad_digest)
    assert fetch_dir(mchannel, asset).status.code == grpc.StatusCode.NOT_FOUND.value[0]  # nothing indexed
    # A bad tree is refused as a referenced directory too.
    error = rpc_error(lambda: push_dir(mchannel, asset, EMPTY, references_directories=[root]))
    assert error.code() == INVALID


@pytest.mark.parametrize(("case", "bad", "name"), CASES, ids=IDS)
def test_update_reference_refuses_bad_names(mchannel, case: str, bad: re_pb2.Directory, name: str) -> None:
    root, bad_digest = plant(mchannel, bad)
    stub = bst_grpc.ReferenceStorageStub(mchannel)
    ref = f"project/element/{uuid.uuid4().hex}"
    error = rpc_error(lambda: stub.UpdateReference(bst_pb2.UpdateReferenceRequest(keys=[ref], digest=root)))
    assert error.code() == INVALID, error.details()
    assert_names(error.details(), f"sub/{name}", bad_digest)
    error = rpc_error(lambda: stub.GetReference(bst_pb2.GetReferenceRequest(key=ref)))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("case", "bad", "name"), CASES, ids=IDS)
def test_update_action_result_refuses_bad_tree(mchannel, case: str, bad: re_pb2.Directory, name: str) -> None:
    """An output Tree with a bad child (named by its path) or a bad root is refused; nothing is stored."""
    bad_digest = sha(data(bad))
    salt = f(f"salt-{uuid.uuid4().hex}")
    for tree, path in ((re_pb2.Tree(root=re_pb2.Directory(files=[salt], directories=[d("sub", bad_digest)]),
                                    children=[bad]), f"sub/{name}"),
                       (re_pb2.Tree(root=re_pb2.Directory(files=bad.files, directories=bad.directories,
                                                          symlinks=bad.symlinks), children=[]), name)):
        upload(mchannel, [data(tree)])
        action = sha(rand(32))
        out = re_pb2.OutputDirectory(path="out", tree_digest=sha(data(tree)))
        result = re_pb2.ActionResult(output_directories=[out])
        error = rpc_error(lambda: put_result(mchannel, result, action))  # noqa: B023 (called at once)
        assert error.code() == INVALID, error.details()
        assert echo(path) in error.details(), error.details()
        assert sha(data(tree)).hash in error.details()
        assert rpc_error(lambda: get_result(mchannel, action)).code() == grpc.StatusCode.NOT_FOUND  # noqa: B023


@pytest.mark.parametrize(("case", "bad", "name"), CASES, ids=IDS)
def test_update_action_result_refuses_bad_root_directory(mchannel, case: str, bad: re_pb2.Directory,
                                                         name: str) -> None:
    """REAPI 2.3 root_directory_digest: the Directory DAG is checked like any tree."""
    root, bad_digest = plant(mchannel, bad)
    action = sha(rand(32))
    result = re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(path="out", root_directory_digest=root)])
    error = rpc_error(lambda: put_result(mchannel, result, action))
    assert error.code() == INVALID, error.details()
    assert_names(error.details(), f"sub/{name}", bad_digest)
    assert rpc_error(lambda: get_result(mchannel, action)).code() == grpc.StatusCode.NOT_FOUND


def test_bad_tree_uploaded_after_its_action_result_is_a_miss(mchannel) -> None:
    """A Tree not in CAS at update time is accepted (a miss until it arrives), then checked at Get."""
    tree = re_pb2.Tree(root=re_pb2.Directory(files=[f("../../escape"), f(f"salt-{uuid.uuid4().hex}")]))
    action = sha(rand(32))
    put_result(mchannel, re_pb2.ActionResult(
        output_directories=[re_pb2.OutputDirectory(path="out", tree_digest=sha(data(tree)))]), action)
    upload(mchannel, [data(tree)])
    error = rpc_error(lambda: get_result(mchannel, action))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert echo("../../escape") in error.details()


@pytest.mark.parametrize("path", ["../x", "a/../../x", "a//b", "/abs", "a/", "", "x\0y"])
def test_update_action_result_refuses_bad_output_paths(mchannel, path: str) -> None:
    for result in (re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path=path, digest=EMPTY)]),
                   re_pb2.ActionResult(output_symlinks=[re_pb2.OutputSymlink(path=path, target="t")])):
        error = rpc_error(lambda: put_result(mchannel, result))  # noqa: B023
        assert error.code() == INVALID
        assert echo(path) in error.details()
    if path:  # the empty output directory path is the whole working directory (REAPI)
        result = re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(path=path, tree_digest=EMPTY)])
        assert rpc_error(lambda: put_result(mchannel, result)).code() == INVALID


@pytest.mark.parametrize(("case", "bad", "name"), CASES, ids=IDS)
def test_get_tree_never_serves_a_bad_directory(mchannel, case: str, bad: re_pb2.Directory, name: str) -> None:
    root, bad_digest = plant(mchannel, bad)
    received: list[re_pb2.Directory] = []

    def walk() -> None:
        for page in cas(mchannel).GetTree(re_pb2.GetTreeRequest(root_digest=root, page_size=1), timeout=30):
            received.extend(page.directories)

    error = rpc_error(walk)
    assert error.code() == REFUSED, error.details()
    assert_names(error.details(), f"sub/{name}", bad_digest)
    assert bad not in received
    # A bad root is refused before anything is sent.
    received.clear()
    bad_root = re_pb2.Directory(files=bad.files, directories=bad.directories, symlinks=bad.symlinks)
    bad_root.files.add(name=f"~{uuid.uuid4().hex}", digest=EMPTY)  # fresh digest, still bad
    upload(mchannel, [data(bad_root)])
    root = sha(data(bad_root))
    error = rpc_error(walk)
    assert error.code() == REFUSED
    assert received == []


def test_fetch_directory_of_a_planted_bad_tree(mserver, mchannel) -> None:
    """An index entry written behind the server's back (an old version, a shared database)
    pointing at a bad tree is never served: FAILED_PRECONDITION naming the entry."""
    root, bad_digest = plant(mchannel, re_pb2.Directory(files=[f("../../../../victim.txt")]))
    asset = uri()
    record = AssetRecord(AssetKind.DIRECTORY, (asset,), (),
                         Digest(root.hash, root.size_bytes, DigestFunction.SHA256), pushed_at=time.time())

    async def write_index() -> None:  # the server's own SQLite file, as a second writer would
        index = SqliteAssetIndex(mserver.data_dir / "assets" / "default.sqlite")
        try:
            await index.put(record)
        finally:
            await index.close()

    asyncio.run(write_index())
    response = fetch_dir(mchannel, asset)
    assert response.status.code == REFUSED.value[0], response
    assert not response.HasField("root_directory_digest")
    assert_names(response.status.message, "sub/../../../../victim.txt", bad_digest)
    # Bazel reads a miss from the RPC status: it gets the same code as an RPC error.
    meta = [("build.bazel.remote.execution.v2.requestmetadata-bin",
             re_pb2.RequestMetadata(tool_details=re_pb2.ToolDetails(tool_name="bazel")).SerializeToString())]
    error = rpc_error(lambda: ra_grpc.FetchStub(mchannel).FetchDirectory(
        ra_pb2.FetchDirectoryRequest(uris=[asset]), metadata=meta, timeout=30))
    assert error.code() == REFUSED


def valid_tree(channel: grpc.Channel) -> re_pb2.Digest:
    """Names the rules must let through: dots inside names, spaces, non-ASCII in code point order
    (U+FF61 before U+1F600, the reverse of UTF-16 order), symlinks with absolute and `..` targets,
    the same name in no two lists, and BuildStream's empty Directory (never uploaded)."""
    content = rand(64)
    upload(channel, [content])
    sub = re_pb2.Directory(files=[re_pb2.FileNode(name="data.bin", digest=sha(content), is_executable=True)])
    root = re_pb2.Directory(
        files=[f(n) for n in ("...", "..x", ".hidden", "a b", "x.o", "\uff61", "\U0001f600")],
        directories=[d("empty"), d("sub", sha(data(sub)))],
        symlinks=[s("abs", "/etc/passwd"), s("up", "../../.."), s("z", f"salt-{uuid.uuid4().hex}")],
    )
    upload(channel, [data(sub), data(root)])
    return sha(data(root))


def test_valid_trees_pass_every_entry_point(mchannel) -> None:
    root = valid_tree(mchannel)
    asset = uri()
    push_dir(mchannel, asset, root, references_directories=[EMPTY])
    response = fetch_dir(mchannel, asset)
    assert response.status.code == 0 and response.root_directory_digest == root
    ref = f"project/element/{uuid.uuid4().hex}"
    stub = bst_grpc.ReferenceStorageStub(mchannel)
    stub.UpdateReference(bst_pb2.UpdateReferenceRequest(keys=[ref], digest=root))
    assert stub.GetReference(bst_pb2.GetReferenceRequest(key=ref)).digest == root
    pages = list(cas(mchannel).GetTree(re_pb2.GetTreeRequest(root_digest=root), timeout=30))
    assert len([x for p in pages for x in p.directories]) == 3  # root, sub, the empty Directory
    # The same tree as an output directory, both ways; output paths as Bazel writes them.
    children = [x for p in pages for x in p.directories][1:]
    tree = re_pb2.Tree(root=pages[0].directories[0], children=children)
    upload(mchannel, [data(tree)])
    action = sha(rand(32))
    result = re_pb2.ActionResult(
        output_files=[re_pb2.OutputFile(path="bazel-out/k8-fastbuild/bin/a.o", digest=EMPTY)],
        output_symlinks=[re_pb2.OutputSymlink(path="bazel-out/link", target="/usr/bin/../lib")],
        output_directories=[re_pb2.OutputDirectory(path="bazel-out/dir", tree_digest=sha(data(tree))),
                            re_pb2.OutputDirectory(path="", root_directory_digest=root)],
    )
    assert put_result(mchannel, result, action) == result
    assert get_result(mchannel, action) == result
