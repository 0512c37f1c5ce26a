"""Every digest function through CAS, ByteStream, the ActionCache, GetTree and Remote Asset.

One server, two instances: `""` with the default functions (SHA1 and MD5 off) and
`all` with every function casbah computes, listed in an unusual order so the
capabilities test can see the configured list is advertised as it is.  Requests are
built by hand with the stubs, as a third-party client would build them.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
from server_test_helpers import OK, ac, bs_read, bs_write, caps, cas, rand, rpc_error

from casbah.digest import Digest, DigestFunction
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

ALL = [DigestFunction.MD5, DigestFunction.SHA1, DigestFunction.GITSHA1, DigestFunction.SHA256,
       DigestFunction.SHA384, DigestFunction.SHA512, DigestFunction.SHA256TREE, DigestFunction.BLAKE3]
#: Functions a client may leave unnamed: REAPI lets the server infer them from the hash length.
INFERABLE = {DigestFunction.SHA256, DigestFunction.SHA1, DigestFunction.MD5, DigestFunction.SHA384,
             DigestFunction.SHA512}
BIG = 3 * 1024 * 1024 // 2  # over ByteStream's one-call limit: the streamed upload path


@pytest.fixture(scope="module")
def channel(module_server_factory, tmp_path_factory: pytest.TempPathFactory):
    config: Path = tmp_path_factory.mktemp("config") / "casbah.yaml"
    functions = ", ".join(f.value for f in ALL)
    config.write_text(f'instances:\n  "": {{}}\n  all:\n    digest-functions: [{functions}]\n')
    server = module_server_factory(["--config", str(config)])
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def proto(d: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=d.hash, size_bytes=d.size)


def find_missing(channel, digests: list[Digest], value: int, instance: str = "all") -> list[tuple[str, int]]:
    response = cas(channel).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, blob_digests=[proto(d) for d in digests], digest_function=value))
    return [(d.hash, d.size_bytes) for d in response.missing_blob_digests]


def name(d: Digest, segment: str, upload: bool = False, instance: str = "all") -> str:
    middle = f"uploads/{uuid.uuid4()}/blobs" if upload else "blobs"
    return f"{instance}/{middle}/{segment}{d.hash}/{d.size}"


@pytest.mark.parametrize("function", ALL, ids=str)
def test_cas_batches_and_find_missing(channel, function: DigestFunction) -> None:
    data = rand(3000)
    d = Digest.of(data, function)
    value = function.proto_value
    assert find_missing(channel, [d], value) == [(d.hash, d.size)]
    response = cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="all", digest_function=value,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(d), data=data)]))
    assert [r.status.code for r in response.responses] == [OK]
    assert find_missing(channel, [d], value) == []
    read = cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        instance_name="all", digests=[proto(d)], digest_function=value))
    assert [(r.status.code, r.data) for r in read.responses] == [(OK, data)]
    # Unset: the server infers from the hash length, which names only the inferable functions;
    # for the others the same hex means another function, hence another (absent) blob.
    unset = find_missing(channel, [d], 0)
    assert unset == ([] if function in INFERABLE else [(d.hash, d.size)])
    # The same hex claimed under another function of its length: verified with that function, refused.
    for other in (f for f in ALL if f.hex_length == function.hex_length and f is not function):
        forged = cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
            instance_name="all", digest_function=other.proto_value,
            requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(d), data=data)]))
        assert forged.responses[0].status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], other
        assert find_missing(channel, [d], other.proto_value) == [(d.hash, d.size)]


@pytest.mark.parametrize("function", ALL, ids=str)
def test_bytestream_write_and_read(channel, function: DigestFunction) -> None:
    data = rand(BIG)
    d = Digest.of(data, function)
    segment = function.resource_segment  # REAPI's form: a segment only where the length cannot tell
    assert bs_write(channel, name(d, segment, upload=True), data, chunk=256 * 1024).committed_size == d.size
    assert bs_read(channel, name(d, segment)) == data
    assert bs_read(channel, name(d, segment), offset=BIG - 10) == data[-10:]
    assert find_missing(channel, [d], function.proto_value) == []
    if function in INFERABLE:  # naming it anyway is unambiguous and accepted
        assert bs_read(channel, name(d, f"{function.value}/"), limit=5) == data[:5]
    else:  # without its segment the hex means sha256 (64) or sha1 (40): another blob
        assert rpc_error(lambda: bs_read(channel, name(d, ""))).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("function", ALL, ids=str)
def test_action_cache(channel, function: DigestFunction) -> None:
    output = rand(500)
    out = Digest.of(output, function)
    value = function.proto_value
    cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="all", digest_function=value,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(out), data=output)]))
    action = Digest.of(rand(100), function)
    result = re_pb2.ActionResult(exit_code=3, output_files=[re_pb2.OutputFile(path="out", digest=proto(out))])
    ac(channel).UpdateActionResult(re_pb2.UpdateActionResultRequest(
        instance_name="all", action_digest=proto(action), action_result=result, digest_function=value))
    got = ac(channel).GetActionResult(re_pb2.GetActionResultRequest(
        instance_name="all", action_digest=proto(action), digest_function=value))
    assert got.exit_code == 3 and got.output_files[0].digest == proto(out)
    unset = re_pb2.GetActionResultRequest(instance_name="all", action_digest=proto(action))
    if function in INFERABLE:
        assert ac(channel).GetActionResult(unset).exit_code == 3
    else:
        assert rpc_error(lambda: ac(channel).GetActionResult(unset)).code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("function", ALL, ids=str)
def test_get_tree_and_remote_asset(channel, function: DigestFunction) -> None:
    value = function.proto_value
    leaf = re_pb2.Directory(files=[re_pb2.FileNode(name="empty", digest=proto(Digest.of(b"", function)))])
    leaf_bytes = leaf.SerializeToString()
    leaf_d = Digest.of(leaf_bytes, function)
    root = re_pb2.Directory(directories=[re_pb2.DirectoryNode(name=f"d{uuid.uuid4().hex}", digest=proto(leaf_d))])
    root_bytes = root.SerializeToString()
    root_d = Digest.of(root_bytes, function)
    cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="all", digest_function=value,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(x), data=b)
                  for x, b in ((leaf_d, leaf_bytes), (root_d, root_bytes))]))
    pages = list(cas(channel).GetTree(re_pb2.GetTreeRequest(
        instance_name="all", root_digest=proto(root_d), digest_function=value)))
    assert [dir_ for page in pages for dir_ in page.directories] == [root, leaf]

    uri = f"https://example.com/{uuid.uuid4()}"
    ra_grpc.PushStub(channel).PushBlob(ra_pb2.PushBlobRequest(
        instance_name="all", uris=[uri], blob_digest=proto(leaf_d), digest_function=value))
    fetched = ra_grpc.FetchStub(channel).FetchBlob(ra_pb2.FetchBlobRequest(
        instance_name="all", uris=[uri], digest_function=value))
    assert fetched.status.code == OK and fetched.blob_digest == proto(leaf_d)


def test_legacy_functions_are_refused_where_not_enabled(channel) -> None:
    """SHA1 and MD5 are off on the default instance: each way of naming them is
    INVALID_ARGUMENT naming the function, and nothing is stored."""
    data = rand(100)
    for function in (DigestFunction.SHA1, DigestFunction.MD5):
        d = Digest.of(data, function)
        calls = {
            "explicit": lambda d=d, f=function: find_missing(channel, [d], f.proto_value, instance=""),
            "inferred": lambda d=d: find_missing(channel, [d], 0, instance=""),
            "batch": lambda d=d, f=function: cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
                digest_function=f.proto_value, requests=[re_pb2.BatchUpdateBlobsRequest.Request(
                    digest=proto(d), data=data)])),
            "bytestream": lambda d=d: bs_write(channel, f"uploads/{uuid.uuid4()}/blobs/{d.hash}/{d.size}", data),
            "action cache": lambda d=d: ac(channel).GetActionResult(re_pb2.GetActionResultRequest(
                action_digest=proto(d))),
        }
        for what, call in calls.items():
            error = rpc_error(call)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert f"digest function {function.value} is not enabled" in error.details(), what
        assert find_missing(channel, [d], function.proto_value) == [(d.hash, d.size)]  # not on `all` either


def test_unknown_functions_and_lengths_are_invalid(channel) -> None:
    h = "a" * 64
    for value in (4, 7, 42):  # VSO and MURMUR3 (casbah computes neither), and no function at all
        error = rpc_error(lambda v=value: cas(channel).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
            blob_digests=[re_pb2.Digest(hash=h, size_bytes=1)], digest_function=v)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "not supported" in error.details()
    error = rpc_error(lambda: bs_read(channel, f"blobs/{'a' * 50}/1"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "50 characters" in error.details()
    error = rpc_error(lambda: bs_read(channel, f"blobs/gitsha1/{h}/1"))  # a gitsha1 hash is 40 hex
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "40" in error.details()


def test_capabilities_advertise_exactly_the_instance_functions(channel) -> None:
    def functions(instance: str) -> list[int]:
        response = caps(channel).GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name=instance))
        assert response.execution_capabilities.digest_function == re_pb2.DigestFunction.SHA256
        return list(response.cache_capabilities.digest_functions)

    assert functions("all") == [f.proto_value for f in ALL]
    f = re_pb2.DigestFunction
    assert functions("") == [f.SHA256, f.SHA384, f.SHA512, f.SHA256TREE, f.BLAKE3, f.GITSHA1]


@pytest.mark.parametrize("function", ALL, ids=str)
def test_a_large_find_missing_batch_answers_exactly(channel, function: DigestFunction) -> None:
    """Batches of 16 and more take the server's array path (request parsed from its bytes,
    the presence table, the response cut from the request: server/wire.py), which every
    function's width must survive; sizes cover 1- to 5-byte varints."""
    blobs = [rand(1 + i * 37) for i in range(40)]
    present = [Digest.of(b, function) for b in blobs]
    cas(channel).BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name="all", digest_function=function.proto_value,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=proto(d), data=b) for d, b in zip(present, blobs,
                                                                                                   strict=True)]))
    absent = [Digest.of(rand(64), function)._replace(size=size)
              for size in (1, 127, 128, 16_383, 16_384, 1 << 21, 1 << 28, 1 << 34) * 20]
    query = [d for pair in zip(absent, present + absent[40:], strict=False) for d in pair]
    for value in {function.proto_value, 0 if function in INFERABLE else function.proto_value}:
        assert find_missing(channel, query, value) == [(d.hash, d.size) for d in query if d in set(absent)]
        # the same digests under an instance that does not serve the function: refused whole
        if function in (DigestFunction.MD5, DigestFunction.SHA1):
            with pytest.raises(grpc.RpcError) as err:
                find_missing(channel, query, value, instance="")
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
