"""ActionCache over real gRPC: hits, misses, overwrites, the completeness check and read-only instances.

A hit tells Bazel it may skip the action; with `--remote_download_minimal` it does
not even fetch the outputs until much later, so a hit whose outputs were evicted
breaks the build.  casbah therefore serves an entry only when everything it names
is still in CAS (unless `check-action-results: false`).
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from server_test_helpers import (
    BLAKE3,
    OPTIONS,
    ac,
    b3,
    bs,
    bs_read,
    caps,
    cas,
    missing,
    rand,
    read_name,
    rpc_error,
    sha,
    update_request,
    upload,
    write_name,
    write_requests,
)

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2


def get(channel: grpc.Channel, action: re_pb2.Digest, function: int = 0, instance: str = "",
        **kwargs) -> re_pb2.ActionResult:
    return ac(channel).GetActionResult(re_pb2.GetActionResultRequest(
        instance_name=instance, action_digest=action, digest_function=function, **kwargs), timeout=10)


def put(channel: grpc.Channel, action: re_pb2.Digest, result: re_pb2.ActionResult, function: int = 0,
        instance: str = "") -> re_pb2.ActionResult:
    return ac(channel).UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name=instance, action_digest=action, action_result=result, digest_function=function), timeout=10)


def code(call) -> grpc.StatusCode:
    return rpc_error(call).code()


def action() -> re_pb2.Digest:
    """An action digest.  The ActionCache never needs the Action itself in CAS."""
    return sha(re_pb2.Action(command_digest=sha(rand(16))).SerializeToString())


def file_result(*files: bytes, stdout: bytes | None = None, digest=sha) -> re_pb2.ActionResult:
    result = re_pb2.ActionResult(
        exit_code=0,
        output_files=[re_pb2.OutputFile(path=f"out/{i}", digest=digest(f), is_executable=i == 0)
                      for i, f in enumerate(files)],
    )
    if stdout is not None:
        result.stdout_digest.CopyFrom(digest(stdout))
    return result


def tree_result(tree: re_pb2.Tree) -> re_pb2.ActionResult:
    return re_pb2.ActionResult(output_directories=[
        re_pb2.OutputDirectory(path="out/dir", tree_digest=sha(tree.SerializeToString()))])


def make_tree(root_file: bytes, child_file: bytes) -> re_pb2.Tree:
    child = re_pb2.Directory(files=[re_pb2.FileNode(name="deep.o", digest=sha(child_file))])
    root = re_pb2.Directory(
        files=[re_pb2.FileNode(name="top.o", digest=sha(root_file))],
        directories=[re_pb2.DirectoryNode(name="empty", digest=sha(b"")),
                     re_pb2.DirectoryNode(name="sub", digest=sha(child.SerializeToString()))],
    )
    return re_pb2.Tree(root=root, children=[child, re_pb2.Directory()])


def test_miss(mchannel) -> None:
    assert code(lambda: get(mchannel, action())) == grpc.StatusCode.NOT_FOUND


def test_update_then_get(mchannel) -> None:
    """The stored result comes back field for field (stdout, exit code, outputs, metadata)."""
    out, stdout = rand(1000), b"compiling...\n"
    upload(mchannel, [out, stdout])
    result = file_result(out, stdout=stdout)
    result.exit_code = 3
    result.execution_metadata.worker = "casbah-test"
    a = action()
    assert put(mchannel, a, result) == result
    assert get(mchannel, a) == result


def test_overwrite(mchannel) -> None:
    """A second UpdateActionResult for the same action replaces the first."""
    first, second = rand(10), rand(20)
    upload(mchannel, [first, second])
    a = action()
    put(mchannel, a, file_result(first))
    put(mchannel, a, file_result(second))
    assert get(mchannel, a) == file_result(second)


def test_missing_output_file_is_a_miss(mchannel) -> None:
    """An entry whose output blob is gone is NOT_FOUND, and becomes a hit once the blob is back."""
    present, absent = rand(100), rand(200)
    upload(mchannel, [present])
    a = action()
    put(mchannel, a, file_result(present, absent))
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND
    upload(mchannel, [absent])
    assert get(mchannel, a) == file_result(present, absent)


def test_missing_stdout_is_a_miss(mchannel) -> None:
    out, stdout = rand(100), rand(50)
    upload(mchannel, [out])
    a = action()
    put(mchannel, a, file_result(out, stdout=stdout))
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND


def test_output_directory_completeness(mchannel) -> None:
    """The Tree blob and every file in it (at any depth) must be present for a hit."""
    top, deep = rand(300), rand(400)
    tree = make_tree(top, deep)
    a = action()
    put(mchannel, a, tree_result(tree))
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND  # no Tree blob
    upload(mchannel, [tree.SerializeToString(), top])
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND  # deep file missing
    upload(mchannel, [deep])
    assert get(mchannel, a) == tree_result(tree)


def test_output_root_directory_completeness(mchannel) -> None:
    """REAPI 2.3 output directories may name a root Directory instead of a Tree: its whole DAG must be present."""
    top, deep = rand(300), rand(400)
    tree = make_tree(top, deep)
    result = re_pb2.ActionResult(output_directories=[
        re_pb2.OutputDirectory(path="out/dir", root_directory_digest=sha(tree.root.SerializeToString()))])
    a = action()
    put(mchannel, a, result)
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND  # no root Directory
    upload(mchannel, [tree.root.SerializeToString(), top])
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND  # subdirectory missing
    upload(mchannel, [tree.children[0].SerializeToString()])
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND  # deep file missing
    upload(mchannel, [deep])
    assert get(mchannel, a) == result


def test_output_tree_blob_that_is_not_a_tree_is_a_miss(mchannel) -> None:
    """A stored entry whose Tree digest names garbage is the entry's fault, not the Get request's:
    NOT_FOUND, not INVALID_ARGUMENT.  (Garbage already in CAS at update time is refused then.)"""
    garbage = b"\xff\xff\xff\xff not a protobuf " + rand(8)
    result = re_pb2.ActionResult(output_directories=[re_pb2.OutputDirectory(path="d", tree_digest=sha(garbage))])
    a = action()
    put(mchannel, a, result)  # the Tree is not uploaded yet: accepted, a miss until it is
    upload(mchannel, [garbage])
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND
    assert code(lambda: put(mchannel, action(), result)) == grpc.StatusCode.INVALID_ARGUMENT


def test_empty_outputs_need_no_upload(mchannel) -> None:
    """Empty files, empty stdout and an empty Tree exist without upload, so the entry is a hit."""
    a = action()
    result = file_result(b"", stdout=b"")
    result.output_directories.append(re_pb2.OutputDirectory(path="d", tree_digest=sha(b"")))
    put(mchannel, a, result)
    assert get(mchannel, a) == result


def test_inline_stdout_and_outputs(mchannel) -> None:
    """inline_stdout / inline_output_files put the bytes in the response (saving Bazel a round trip)."""
    out1, out2, stdout, stderr = rand(100), rand(200), b"hello from the action\n", b"warning: x\n"
    upload(mchannel, [out1, out2, stdout, stderr])
    result = file_result(out1, out2, stdout=stdout)
    result.stderr_digest.CopyFrom(sha(stderr))
    a = action()
    put(mchannel, a, result)
    got = get(mchannel, a, inline_stdout=True, inline_output_files=["out/1"])
    assert got.stdout_raw == stdout
    assert got.stderr_raw == b""  # not asked for
    assert got.stdout_digest == sha(stdout)
    assert [f.contents for f in got.output_files] == [b"", out2]
    plain = get(mchannel, a)
    assert plain.stdout_raw == b"" and all(not f.contents for f in plain.output_files)


def test_blake3_action_results(mchannel) -> None:
    """BLAKE3 entries and their outputs are looked up with BLAKE3; the same hex under SHA256 is a miss."""
    out = rand(500)
    upload(mchannel, [out], BLAKE3)
    a = b3(rand(64))
    result = file_result(out, digest=b3)
    put(mchannel, a, result, BLAKE3)
    assert get(mchannel, a, BLAKE3) == result
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND


def test_malformed_digests(mchannel) -> None:
    """A malformed action digest, or a result naming malformed digests, is refused at the door."""
    bad = re_pb2.Digest(hash="XYZ", size_bytes=1)
    assert code(lambda: get(mchannel, bad)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: put(mchannel, bad, re_pb2.ActionResult())) == grpc.StatusCode.INVALID_ARGUMENT
    result = re_pb2.ActionResult(output_files=[re_pb2.OutputFile(path="x", digest=bad)])
    a = action()
    assert code(lambda: put(mchannel, a, result)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: get(mchannel, a)) == grpc.StatusCode.NOT_FOUND


def test_unknown_instance(mchannel) -> None:
    assert code(lambda: get(mchannel, action(), instance="nope")) == grpc.StatusCode.INVALID_ARGUMENT


def test_instances_share_the_action_cache(mchannel) -> None:
    """Names added with --instance share the default instance's storage and ActionCache."""
    out = rand(100)
    upload(mchannel, [out], instance="a/b/c")
    a = action()
    put(mchannel, a, file_result(out), instance="a/b/c")
    assert get(mchannel, a) == file_result(out)


def test_check_action_results_false(start_server, tmp_path: Path) -> None:
    """With check-action-results: false an entry is served even though its outputs are absent."""
    config = tmp_path / "casbah.yaml"
    config.write_text('instances: {"": {check-action-results: false}}\n')
    server = start_server(["--config", str(config)])
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        a = action()
        result = file_result(rand(100), stdout=rand(10))
        put(channel, a, result)
        assert get(channel, a) == result


def test_read_only_instance(start_server, tmp_path: Path) -> None:
    """A read-only instance serves what is stored and refuses every write with PERMISSION_DENIED."""
    out = rand(1000)
    a = action()
    seeder = start_server(data_dir=tmp_path / "data")
    with grpc.insecure_channel(seeder.address, options=OPTIONS) as channel:
        upload(channel, [out])
        put(channel, a, file_result(out))
    seeder.stop()
    config = tmp_path / "casbah.yaml"
    config.write_text('instances: {"": {read-only: true}}\n')
    server = start_server(["--config", str(config)], data_dir=tmp_path / "data")
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        # Reads work.
        assert get(channel, a) == file_result(out)
        assert bs_read(channel, read_name(sha(out))) == out
        assert missing(channel, [sha(out)]) == set()
        assert not caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest()).cache_capabilities \
            .action_cache_update_capabilities.update_enabled
        # Writes do not.
        new = rand(100)
        assert code(lambda: put(channel, action(), file_result(out))) == grpc.StatusCode.PERMISSION_DENIED
        assert code(lambda: cas(channel).BatchUpdateBlobs(update_request([new]))) == \
            grpc.StatusCode.PERMISSION_DENIED
        for chunk in (0, 16):
            requests = write_requests(write_name(sha(new)), new, chunk=chunk)
            assert code(lambda r=requests: bs(channel).Write(r)) == grpc.StatusCode.PERMISSION_DENIED
        assert missing(channel, [sha(new)]) == {(sha(new).hash, 100)}


@pytest.mark.parametrize("services", ["cas,bytestream,capabilities"])
def test_action_cache_service_disabled(start_server, services: str) -> None:
    """With the action-cache service off, ActionCache calls are UNIMPLEMENTED and update_enabled is false."""
    server = start_server(["--services", services])
    with grpc.insecure_channel(server.address) as channel:
        assert code(lambda: get(channel, action())) == grpc.StatusCode.UNIMPLEMENTED
        assert not caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest()).cache_capabilities \
            .action_cache_update_capabilities.update_enabled
