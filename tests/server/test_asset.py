"""Remote Asset Fetch/Push and BuildStream's ReferenceStorage over real gRPC.

BuildStream 2 stores every artifact and source as an asset and probes the
service with malformed requests at startup; Bazel's remote downloader takes any
OK FetchBlob as a hit.  A wrong answer here is either a server the client skips,
a rebuild that should have been a cache hit, or (worse) a hit whose content is
gone, which fails the build later with a confusing download error.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from server_test_helpers import (
    BLAKE3,
    OK,
    OPTIONS,
    SHA256,
    b3,
    digest_for,
    key,
    missing,
    rand,
    rpc_error,
    sha,
    upload,
)

from casbah.digest import Digest
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2 as ra_pb2
from casbah.protos.build.bazel.remote.asset.v1 import remote_asset_pb2_grpc as ra_grpc
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2 as bst_pb2
from casbah.protos.buildstream.v2 import buildstream_pb2_grpc as bst_grpc
from casbah.storage.engine import Engine

NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
REQUEST_METADATA = "build.bazel.remote.execution.v2.requestmetadata-bin"
EMPTY_DIRECTORY = sha(b"")  # the serialized empty Directory is the empty blob
REF_PREFIX = "urn:fdc:buildstream.build:2020:v1:"


# -- helpers -------------------------------------------------------------------------


def fetch(channel: grpc.Channel) -> ra_grpc.FetchStub:
    return ra_grpc.FetchStub(channel)


def push(channel: grpc.Channel) -> ra_grpc.PushStub:
    return ra_grpc.PushStub(channel)


def refs(channel: grpc.Channel) -> bst_grpc.ReferenceStorageStub:
    return bst_grpc.ReferenceStorageStub(channel)


def uri() -> str:
    """A fresh URI: tests share a server and must not see each other's assets."""
    return f"urn:fdc:casbah.test:{uuid.uuid4()}"


def quals(**pairs: str) -> list[ra_pb2.Qualifier]:
    return [ra_pb2.Qualifier(name=n.replace("_", "."), value=v) for n, v in pairs.items()]


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def bazel_metadata(tool: str = "bazel") -> list[tuple[str, bytes]]:
    meta = re_pb2.RequestMetadata(tool_details=re_pb2.ToolDetails(tool_name=tool, tool_version="4.2.3"))
    return [(REQUEST_METADATA, meta.SerializeToString())]


def push_blob(channel: grpc.Channel, uris: list[str], digest: re_pb2.Digest, qualifiers=(), instance: str = "",
              function: int = 0, **fields) -> ra_pb2.PushBlobResponse:
    return push(channel).PushBlob(ra_pb2.PushBlobRequest(
        instance_name=instance, uris=uris, qualifiers=list(qualifiers), blob_digest=digest,
        digest_function=function, **fields), timeout=30)


def push_dir(channel: grpc.Channel, uris: list[str], digest: re_pb2.Digest, qualifiers=(), instance: str = "",
             function: int = 0, **fields) -> ra_pb2.PushDirectoryResponse:
    return push(channel).PushDirectory(ra_pb2.PushDirectoryRequest(
        instance_name=instance, uris=uris, qualifiers=list(qualifiers), root_directory_digest=digest,
        digest_function=function, **fields), timeout=30)


def fetch_blob(channel: grpc.Channel, uris: list[str], qualifiers=(), instance: str = "", function: int = 0,
               metadata=None, **fields) -> ra_pb2.FetchBlobResponse:
    return fetch(channel).FetchBlob(ra_pb2.FetchBlobRequest(
        instance_name=instance, uris=uris, qualifiers=list(qualifiers), digest_function=function, **fields),
        timeout=30, metadata=metadata)


def fetch_dir(channel: grpc.Channel, uris: list[str], qualifiers=(), instance: str = "", function: int = 0,
              metadata=None, **fields) -> ra_pb2.FetchDirectoryResponse:
    return fetch(channel).FetchDirectory(ra_pb2.FetchDirectoryRequest(
        instance_name=instance, uris=uris, qualifiers=list(qualifiers), digest_function=function, **fields),
        timeout=30, metadata=metadata)


def assert_blob_hit(response: ra_pb2.FetchBlobResponse, digest: re_pb2.Digest, uri: str | None = None) -> None:
    assert response.status.code == OK, response
    assert key(response.blob_digest) == key(digest)
    if uri is not None:
        assert response.uri == uri


def assert_miss(response) -> None:
    """A miss as the spec says: OK call, NOT_FOUND in `status`, no digest."""
    assert response.status.code == NOT_FOUND, response
    assert response.status.message
    digest = response.blob_digest if hasattr(response, "blob_digest") else response.root_directory_digest
    assert not digest.hash


@dataclass
class Tree:
    """A small tree uploaded to CAS: root/{a.txt, bin/tool (executable), sub/{b.txt}}."""

    root: re_pb2.Digest
    directories: list[re_pb2.Digest]
    files: list[re_pb2.Digest]
    blobs: dict[tuple[str, int], bytes]


def make_tree(file_size: int = 100, function: int = SHA256) -> Tree:
    """Build (but do not upload) a tree with fresh random file contents."""
    contents = {"a.txt": rand(file_size), "tool": rand(50), "b.txt": rand(70)}
    digests = {name: digest_for(data, function) for name, data in contents.items()}
    blobs = {key(digests[n]): contents[n] for n in contents}

    def node(name: str, exe: bool = False) -> re_pb2.FileNode:
        return re_pb2.FileNode(name=name, digest=digests[name], is_executable=exe)

    sub = re_pb2.Directory(files=[node("b.txt")]).SerializeToString(deterministic=True)
    bindir = re_pb2.Directory(files=[node("tool", True)]).SerializeToString(deterministic=True)
    sub_d, bin_d = digest_for(sub, function), digest_for(bindir, function)
    root = re_pb2.Directory(
        files=[node("a.txt")],
        directories=[re_pb2.DirectoryNode(name="bin", digest=bin_d), re_pb2.DirectoryNode(name="sub", digest=sub_d)],
    ).SerializeToString(deterministic=True)
    root_d = digest_for(root, function)
    blobs.update({key(sub_d): sub, key(bin_d): bindir, key(root_d): root})
    return Tree(root_d, [root_d, bin_d, sub_d], [digests[n] for n in contents], blobs)


def upload_tree(channel: grpc.Channel, tree: Tree, function: int = 0, instance: str = "",
                skip: tuple[re_pb2.Digest, ...] = ()) -> None:
    skipped = {key(d) for d in skip}
    upload(channel, [data for k, data in tree.blobs.items() if k not in skipped], function=function,
           instance=instance)


def new_blob(channel: grpc.Channel, size: int = 64, function: int = 0, instance: str = "") -> re_pb2.Digest:
    return upload(channel, [rand(size)], function=function, instance=instance)[0]


def write_config(directory: Path, text: str) -> str:
    path = directory / f"casbah-{uuid.uuid4().hex[:8]}.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def open_channel() -> Iterator[Callable[[object], grpc.Channel]]:
    """`open_channel(server)` -> a channel closed at the end of the test."""
    channels: list[grpc.Channel] = []

    def open_(server) -> grpc.Channel:
        ch = grpc.insecure_channel(server.address, options=OPTIONS)
        channels.append(ch)
        return ch

    yield open_
    for ch in channels:
        ch.close()


# -- request validation: how BuildStream decides whether to use the server ------------------


RPCS = {
    "FetchBlob": lambda ch, **kw: fetch(ch).FetchBlob(ra_pb2.FetchBlobRequest(**kw), timeout=30),
    "FetchDirectory": lambda ch, **kw: fetch(ch).FetchDirectory(ra_pb2.FetchDirectoryRequest(**kw), timeout=30),
    "PushBlob": lambda ch, **kw: push(ch).PushBlob(
        ra_pb2.PushBlobRequest(blob_digest=sha(b"x"), **kw), timeout=30),
    "PushDirectory": lambda ch, **kw: push(ch).PushDirectory(
        ra_pb2.PushDirectoryRequest(root_directory_digest=EMPTY_DIRECTORY, **kw), timeout=30),
}

BAD_REQUESTS = {
    "no-uris": {},
    "empty-uri": {"uris": ["urn:x", ""]},
    "duplicate-qualifier": {"uris": ["urn:x"], "qualifiers": quals(a="1") + quals(a="1")},
}


@pytest.mark.parametrize("problem", list(BAD_REQUESTS))
@pytest.mark.parametrize("method", list(RPCS))
def test_malformed_requests_are_invalid_argument(mchannel, method: str, problem: str) -> None:
    """buildbox-casd probes Fetch and Push with URI-less requests and uses the server only on
    INVALID_ARGUMENT; the same code answers every malformed request, on all four RPCs."""
    error = rpc_error(lambda: RPCS[method](mchannel, **BAD_REQUESTS[problem]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    if problem == "duplicate-qualifier":
        assert "'a'" in error.details()


def test_unknown_instance_is_invalid_argument(mchannel) -> None:
    error = rpc_error(lambda: fetch_blob(mchannel, [uri()], instance="nope"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "nope" in error.details()


# -- matching -------------------------------------------------------------------------


def test_alias_uris_fetch_by_either(mchannel) -> None:
    """Every pushed URI names the same content (BuildStream pushes strong and weak keys)."""
    strong, weak = uri(), uri()
    digest = new_blob(mchannel)
    push_blob(mchannel, [strong, weak], digest)
    assert_blob_hit(fetch_blob(mchannel, [strong]), digest, strong)
    assert_blob_hit(fetch_blob(mchannel, [weak]), digest, weak)
    # Several fetch URIs: any one that matches is enough, and `uri` says which.
    assert_blob_hit(fetch_blob(mchannel, [uri(), weak]), digest, weak)


def test_qualifier_order_is_irrelevant(mchannel) -> None:
    name, digest = uri(), new_blob(mchannel)
    push_blob(mchannel, [name], digest, quals(a="1", b="2", c="3"))
    assert_blob_hit(fetch_blob(mchannel, [name], quals(c="3", a="1", b="2")), digest)
    response = fetch_blob(mchannel, [name], quals(b="2", a="1"))
    assert_blob_hit(response, digest)
    assert {(q.name, q.value) for q in response.qualifiers} == {("a", "1"), ("b", "2"), ("c", "3")}


def test_subset_of_qualifiers_matches_and_different_value_misses(mchannel) -> None:
    """Clients push every qualifier they know and fetch with the minimal identifying set."""
    name, digest = uri(), new_blob(mchannel)
    push_blob(mchannel, [name], digest, quals(resource_type="application/x-tar", checksum_sri="sha256-AAAA"))
    assert_blob_hit(fetch_blob(mchannel, [name]), digest)
    assert_blob_hit(fetch_blob(mchannel, [name], quals(checksum_sri="sha256-AAAA")), digest)
    assert_miss(fetch_blob(mchannel, [name], quals(checksum_sri="sha256-BBBB")))
    # A qualifier the pusher did not state is not implied either.
    assert_miss(fetch_blob(mchannel, [name], quals(vcs_commit="0" * 40)))
    # Blobs and directories are separate namespaces.
    assert_miss(fetch_dir(mchannel, [name]))


def test_most_recent_push_wins(mchannel) -> None:
    name = uri()
    old, new = new_blob(mchannel), new_blob(mchannel)
    push_blob(mchannel, [name], old, quals(a="1"))
    push_blob(mchannel, [name], new, quals(a="1", b="2"))
    assert_blob_hit(fetch_blob(mchannel, [name], quals(a="1")), new)
    # Re-pushing the first variant replaces it and makes it the newest.
    push_blob(mchannel, [name], old, quals(a="1"))
    assert_blob_hit(fetch_blob(mchannel, [name], quals(a="1")), old)
    # The more specific fetch still finds the only variant with b=2.
    assert_blob_hit(fetch_blob(mchannel, [name], quals(b="2")), new)


def test_expire_at(mchannel) -> None:
    """An expired association is a miss; a future expiry is reported back."""
    gone, kept = uri(), uri()
    digest = new_blob(mchannel)
    push_blob(mchannel, [gone], digest, expire_at=ts(time.time() - 1))
    assert_miss(fetch_blob(mchannel, [gone]))
    later = time.time() + 3600
    push_blob(mchannel, [kept], digest, expire_at=ts(later))
    response = fetch_blob(mchannel, [kept])
    assert_blob_hit(response, digest)
    assert abs(response.expires_at.ToNanoseconds() / 1e9 - later) < 1


def test_oldest_content_accepted(mchannel) -> None:
    name, digest = uri(), new_blob(mchannel)
    push_blob(mchannel, [name], digest)
    assert_miss(fetch_blob(mchannel, [name], oldest_content_accepted=ts(time.time() + 60)))
    assert_blob_hit(fetch_blob(mchannel, [name], oldest_content_accepted=ts(time.time() - 60)), digest)


def test_push_and_fetch_directory(mchannel) -> None:
    tree = make_tree()
    upload_tree(mchannel, tree)
    name = uri()
    push_dir(mchannel, [name], tree.root, quals(vcs_commit="1" * 40))
    response = fetch_dir(mchannel, [name])
    assert response.status.code == OK
    assert key(response.root_directory_digest) == key(tree.root)
    assert response.uri == name
    assert_miss(fetch_blob(mchannel, [name]))


def test_many_variants_under_one_uri(mchannel) -> None:
    """Thousands of qualifier variants under one URI (e.g. per-platform builds) stay exact."""
    name = uri()
    digests = [new_blob(mchannel) for _ in range(3)]
    for i in range(60):
        push_blob(mchannel, [name], digests[i % 3], quals(platform=f"p{i}", kind=str(i % 3)))
    for i in (0, 31, 59):
        assert_blob_hit(fetch_blob(mchannel, [name], quals(platform=f"p{i}")), digests[i % 3])
    assert_blob_hit(fetch_blob(mchannel, [name], quals(platform="p7", kind="1")), digests[1])
    assert_miss(fetch_blob(mchannel, [name], quals(platform="p7", kind="2")))
    # Without qualifiers the newest of all 60 wins (i = 59).
    assert_blob_hit(fetch_blob(mchannel, [name]), digests[59 % 3])


# -- push preconditions -------------------------------------------------------------------


def test_push_blob_with_missing_content_is_refused(mchannel) -> None:
    """Push names content that must already be in CAS; refusing it indexes nothing."""
    name, data = uri(), rand(80)
    error = rpc_error(lambda: push_blob(mchannel, [name], sha(data)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert sha(data).hash in error.details()
    upload(mchannel, [data])
    assert_miss(fetch_blob(mchannel, [name]))


def test_push_directory_with_missing_content_is_refused(mchannel) -> None:
    tree = make_tree()
    name = uri()
    # Root missing.
    error = rpc_error(lambda: push_dir(mchannel, [name], tree.root))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Root and subdirectories present, one file deep in the tree missing.
    upload_tree(mchannel, tree, skip=(tree.files[2],))
    error = rpc_error(lambda: push_dir(mchannel, [name], tree.root))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert tree.files[2].hash in error.details()
    upload_tree(mchannel, tree)
    assert_miss(fetch_dir(mchannel, [name]))
    push_dir(mchannel, [name], tree.root)
    assert key(fetch_dir(mchannel, [name]).root_directory_digest) == key(tree.root)


def test_push_directory_that_is_not_a_directory(mchannel) -> None:
    """A root that is not a Directory message is the client's mistake, not missing content."""
    junk = upload(mchannel, [b"\xff\xff\xff not a protobuf"])[0]
    error = rpc_error(lambda: push_dir(mchannel, [uri()], junk))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_push_references(mchannel) -> None:
    """BuildStream pushes artifact blobs with references_blobs/_directories; those must exist,
    except the empty Directory, which it names without ever uploading."""
    digest = new_blob(mchannel)
    tree = make_tree()
    upload_tree(mchannel, tree)
    absent_blob, absent_tree = sha(rand(10)), make_tree().root
    name = uri()
    error = rpc_error(lambda: push_blob(mchannel, [name], digest, references_blobs=[absent_blob]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    error = rpc_error(lambda: push_blob(mchannel, [name], digest, references_directories=[absent_tree]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_miss(fetch_blob(mchannel, [name]))
    push_blob(mchannel, [name], digest, references_blobs=[new_blob(mchannel)],
              references_directories=[EMPTY_DIRECTORY, tree.root])
    assert_blob_hit(fetch_blob(mchannel, [name]), digest)
    # Directory assets may reference content too.
    push_dir(mchannel, [name], EMPTY_DIRECTORY, references_directories=[EMPTY_DIRECTORY])
    assert key(fetch_dir(mchannel, [name]).root_directory_digest) == key(EMPTY_DIRECTORY)


def test_blake3_assets(mchannel) -> None:
    """digest_function BLAKE3: assets are kept per function and echoed back."""
    data = rand(300)
    digest = upload(mchannel, [data], function=BLAKE3)[0]
    assert digest == b3(data)
    name = uri()
    push_blob(mchannel, [name], digest, function=BLAKE3)
    response = fetch_blob(mchannel, [name], function=BLAKE3)
    assert_blob_hit(response, digest)
    assert response.digest_function == BLAKE3
    # The same name under SHA-256 is a different asset.
    assert_miss(fetch_blob(mchannel, [name]))
    assert_miss(fetch_blob(mchannel, [name], function=SHA256))
    # A SHA-256 push of a BLAKE3-only blob is refused (the blob is not in SHA-256 CAS).
    error = rpc_error(lambda: push_blob(mchannel, [uri()], digest))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    tree = make_tree(function=BLAKE3)
    upload_tree(mchannel, tree, function=BLAKE3)
    push_dir(mchannel, [name], tree.root, function=BLAKE3)
    response = fetch_dir(mchannel, [name], function=BLAKE3)
    assert response.status.code == OK
    assert key(response.root_directory_digest) == key(tree.root)
    assert_miss(fetch_dir(mchannel, [name]))


# -- how a miss is reported -------------------------------------------------------------------


def test_bazel_miss_is_rpc_not_found(mchannel) -> None:
    """Bazel 4.2 ignores FetchBlobResponse.status, so it gets an RPC error; others get the status."""
    name = uri()
    error = rpc_error(lambda: fetch_blob(mchannel, [name], metadata=bazel_metadata()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert name in error.details()
    error = rpc_error(lambda: fetch_dir(mchannel, [name], metadata=bazel_metadata()))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert_miss(fetch_blob(mchannel, [name]))
    assert_miss(fetch_blob(mchannel, [name], metadata=bazel_metadata("buildstream")))
    # A Bazel hit is a plain OK response.
    digest = new_blob(mchannel)
    push_blob(mchannel, [name], digest)
    assert_blob_hit(fetch_blob(mchannel, [name], metadata=bazel_metadata()), digest)


@pytest.fixture(scope="module")
def miss_modes_server(module_server_factory, tmp_path_factory):
    config = write_config(tmp_path_factory.mktemp("cfg"), """
instances:
  rpc:
    asset-miss: rpc-error
    asset-index: memory
  status:
    asset-miss: status
    asset-index: memory
""")
    return module_server_factory(["--config", config])


def test_asset_miss_config(miss_modes_server, open_channel) -> None:
    ch = open_channel(miss_modes_server)
    error = rpc_error(lambda: fetch_blob(ch, [uri()], instance="rpc"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert_miss(fetch_blob(ch, [uri()], instance="status", metadata=bazel_metadata()))
    assert_miss(fetch_dir(ch, [uri()], instance="status", metadata=bazel_metadata()))
    # Request errors stay RPC errors whatever the mode.
    error = rpc_error(lambda: fetch_blob(ch, [], instance="status"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- content that left CAS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_server(module_server_factory, tmp_path_factory):
    """Memory storage with a 100 KiB quota: uploads evict older blobs (LRU)."""
    config = write_config(tmp_path_factory.mktemp("cfg"), """
storages:
  tiny: {kind: memory, max-size: 100K}
instances:
  "":
    storage: tiny
    asset-index: memory
""")
    return module_server_factory(["--config", config])


def test_evicted_file_makes_directory_a_miss(tiny_server, open_channel) -> None:
    """Only the file is evicted (its Directory blobs stay): the tree is incomplete, so the
    asset is a miss, even though the same tree was found complete a moment before."""
    ch = open_channel(tiny_server)
    tree = make_tree(file_size=40 * 1024)
    upload_tree(ch, tree)
    name = uri()
    push_dir(ch, [name], tree.root)
    assert key(fetch_dir(ch, [name]).root_directory_digest) == key(tree.root)  # complete, remembered
    big_file = tree.files[0]
    # Touch everything but the big file, so it is the least recently used blob, then overflow.
    assert not missing(ch, tree.directories + tree.files[1:])
    new_blob(ch, 70 * 1024)
    assert missing(ch, tree.directories + tree.files) == {key(big_file)}
    assert_miss(fetch_dir(ch, [name]))
    # Re-uploading the file makes the asset whole again.
    upload(ch, [tree.blobs[key(big_file)]])
    assert key(fetch_dir(ch, [name]).root_directory_digest) == key(tree.root)


def test_evicted_blob_and_reference_make_blob_a_miss(tiny_server, open_channel) -> None:
    ch = open_channel(tiny_server)
    blob, ref = new_blob(ch, 30 * 1024), new_blob(ch, 30 * 1024)
    by_blob, by_ref = uri(), uri()
    push_blob(ch, [by_blob], blob)
    artifact = new_blob(ch, 100)
    push_blob(ch, [by_ref], artifact, references_blobs=[ref])
    assert_blob_hit(fetch_blob(ch, [by_blob]), blob)
    assert_blob_hit(fetch_blob(ch, [by_ref]), artifact)
    assert not missing(ch, [artifact])  # the artifact blob is the most recently used: it survives
    new_blob(ch, 70 * 1024)  # LRU order is blob, ref, artifact: 70 KiB more evicts blob and ref
    assert missing(ch, [blob, ref, artifact]) == {key(blob), key(ref)}
    assert_miss(fetch_blob(ch, [by_blob]))
    # An asset whose referenced content is gone cannot be used by BuildStream either.
    assert_miss(fetch_blob(ch, [by_ref]))


def test_deleted_object_after_restart_is_a_miss(start_server, open_channel) -> None:
    """Disk storage: a blob removed behind the server's back (through the engine while the
    server is stopped) makes the directory asset a miss after the restart; the SQLite
    asset index survives the restart and still serves the intact asset."""
    server = start_server()
    ch = open_channel(server)
    damaged, intact = make_tree(), make_tree()
    upload_tree(ch, damaged)
    upload_tree(ch, intact)
    damaged_uri, intact_uri = uri(), uri()
    push_dir(ch, [damaged_uri], damaged.root)
    push_dir(ch, [intact_uri], intact.root)
    victim = damaged.files[2]  # sub/b.txt, two levels down
    server.stop()
    store = Engine(str(server.data_dir / "cas"))
    try:
        assert store.drop([Digest(victim.hash, victim.size_bytes)]) == 1
    finally:
        store.close()
    server.start()
    ch = open_channel(server)
    assert missing(ch, [victim]) == {key(victim)}
    assert_miss(fetch_dir(ch, [damaged_uri]))
    assert key(fetch_dir(ch, [intact_uri]).root_directory_digest) == key(intact.root)


# -- persistence and index kinds ------------------------------------------------------------


def test_sqlite_index_survives_restart(start_server, open_channel) -> None:
    server = start_server()
    ch = open_channel(server)
    digest = new_blob(ch)
    tree = make_tree()
    upload_tree(ch, tree)
    name = uri()
    push_blob(ch, [name, name + ":alias"], digest, quals(a="1"))
    push_dir(ch, [name], tree.root)
    refs(ch).UpdateReference(bst_pb2.UpdateReferenceRequest(keys=["k1"], digest=tree.root))
    assert (server.data_dir / "assets" / "default.sqlite").is_file()
    server.restart()
    ch = open_channel(server)
    assert_blob_hit(fetch_blob(ch, [name + ":alias"], quals(a="1")), digest)
    assert key(fetch_dir(ch, [name]).root_directory_digest) == key(tree.root)
    assert key(refs(ch).GetReference(bst_pb2.GetReferenceRequest(key="k1")).digest) == key(tree.root)


def test_memory_index(start_server, tmp_path, open_channel) -> None:
    """`asset-index: memory` serves pushes, keeps no file and forgets on restart."""
    config = write_config(tmp_path, "instances:\n  '': {asset-index: memory}\n")
    server = start_server(["--config", config])
    ch = open_channel(server)
    name, digest = uri(), new_blob(ch)
    push_blob(ch, [name], digest, quals(a="1"))
    assert_blob_hit(fetch_blob(ch, [name], quals(a="1")), digest)
    assert not (server.data_dir / "assets").exists()
    server.restart()
    ch = open_channel(server)
    assert not missing(ch, [digest])  # the blob is still on disk...
    assert_miss(fetch_blob(ch, [name]))  # ...but the name is gone


def test_sqlite_index_at_configured_path(start_server, tmp_path, open_channel) -> None:
    path = tmp_path / "elsewhere" / "index.db"
    config = write_config(tmp_path, f"instances:\n  '': {{asset-index: {{kind: sqlite, path: '{path}'}}}}\n")
    server = start_server(["--config", config])
    ch = open_channel(server)
    name, digest = uri(), new_blob(ch)
    push_blob(ch, [name], digest)
    assert path.is_file()
    server.restart()
    assert_blob_hit(fetch_blob(open_channel(server), [name]), digest)


# -- read-only instances -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rw_ro_server(module_server_factory, tmp_path_factory):
    """Instances `rw` and `ro` on one storage and one asset index; `ro` is read-only."""
    directory = tmp_path_factory.mktemp("cfg")
    index = directory / "shared-assets.sqlite"
    config = write_config(directory, f"""
storages:
  shared: {{kind: memory, max-size: 64M}}
instances:
  rw:
    storage: shared
    asset-index: {{kind: sqlite, path: '{index}'}}
  ro:
    storage: shared
    asset-index: {{kind: sqlite, path: '{index}'}}
    read-only: true
""")
    return module_server_factory(["--config", config])


def test_read_only_instance(rw_ro_server, open_channel) -> None:
    ch = open_channel(rw_ro_server)
    digest = new_blob(ch, instance="rw")
    tree = make_tree()
    upload_tree(ch, tree, instance="rw")
    name = uri()
    push_blob(ch, [name], digest, instance="rw")
    refs(ch).UpdateReference(bst_pb2.UpdateReferenceRequest(instance_name="rw", keys=["ro-test"], digest=tree.root))

    for call in (lambda: push_blob(ch, [uri()], digest, instance="ro"),
                 lambda: push_dir(ch, [uri()], tree.root, instance="ro"),
                 lambda: refs(ch).UpdateReference(bst_pb2.UpdateReferenceRequest(
                     instance_name="ro", keys=["x"], digest=tree.root))):
        error = rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert "read-only" in error.details()
    # BuildStream's probe still gets INVALID_ARGUMENT, so it uses the read-only cache for pulls.
    error = rpc_error(lambda: push(ch).PushBlob(ra_pb2.PushBlobRequest(instance_name="ro"), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not refs(ch).Status(bst_pb2.StatusRequest(instance_name="ro")).allow_updates
    assert refs(ch).Status(bst_pb2.StatusRequest(instance_name="rw")).allow_updates
    # Reads work.
    assert_blob_hit(fetch_blob(ch, [name], instance="ro"), digest)
    got = refs(ch).GetReference(bst_pb2.GetReferenceRequest(instance_name="ro", key="ro-test"))
    assert key(got.digest) == key(tree.root)


# -- ReferenceStorage -----------------------------------------------------------------------------


def test_references_roundtrip(mchannel) -> None:
    tree = make_tree()
    stub = refs(mchannel)
    k1, k2 = f"proj/elem/{uuid.uuid4().hex}", f"proj/elem/{uuid.uuid4().hex}"
    error = rpc_error(lambda: stub.GetReference(bst_pb2.GetReferenceRequest(key=k1)))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = rpc_error(lambda: stub.UpdateReference(bst_pb2.UpdateReferenceRequest(keys=[k1], digest=tree.root)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    upload_tree(mchannel, tree)
    stub.UpdateReference(bst_pb2.UpdateReferenceRequest(keys=[k1, k2], digest=tree.root))
    for k in (k1, k2):
        assert key(stub.GetReference(bst_pb2.GetReferenceRequest(key=k)).digest) == key(tree.root)
    # The same name, seen through Remote Asset (BuildStream 1.6's asset mode).
    assert key(fetch_dir(mchannel, [REF_PREFIX + k2]).root_directory_digest) == key(tree.root)
    error = rpc_error(lambda: stub.GetReference(bst_pb2.GetReferenceRequest(key="")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.Status(bst_pb2.StatusRequest()).allow_updates


# -- --services ------------------------------------------------------------------------------------


def test_services_without_asset(start_server, open_channel) -> None:
    server = start_server(["--services", "capabilities,cas,bytestream,action-cache,references"])
    ch = open_channel(server)
    for call in (lambda: fetch_blob(ch, [uri()]), lambda: fetch_dir(ch, [uri()]),
                 lambda: push_blob(ch, [uri()], EMPTY_DIRECTORY),
                 lambda: push_dir(ch, [uri()], EMPTY_DIRECTORY)):
        assert rpc_error(call).code() == grpc.StatusCode.UNIMPLEMENTED
    tree = make_tree()
    upload_tree(ch, tree)
    refs(ch).UpdateReference(bst_pb2.UpdateReferenceRequest(keys=["only-refs"], digest=tree.root))
    assert key(refs(ch).GetReference(bst_pb2.GetReferenceRequest(key="only-refs")).digest) == key(tree.root)
    assert refs(ch).Status(bst_pb2.StatusRequest()).allow_updates


def test_services_without_references(start_server, open_channel) -> None:
    server = start_server(["--services", "capabilities,cas,asset"])
    ch = open_channel(server)
    stub = refs(ch)
    for call in (lambda: stub.Status(bst_pb2.StatusRequest()),
                 lambda: stub.GetReference(bst_pb2.GetReferenceRequest(key="k")),
                 lambda: stub.UpdateReference(bst_pb2.UpdateReferenceRequest(keys=["k"], digest=EMPTY_DIRECTORY))):
        assert rpc_error(call).code() == grpc.StatusCode.UNIMPLEMENTED
    name, digest = uri(), new_blob(ch)
    push_blob(ch, [name], digest)
    assert_blob_hit(fetch_blob(ch, [name]), digest)
    # The probe still answers INVALID_ARGUMENT.
    assert rpc_error(lambda: fetch_blob(ch, [])).code() == grpc.StatusCode.INVALID_ARGUMENT


def test_fetch_timeout_field_is_accepted_without_origin(mchannel) -> None:
    """A timeout without origin fetch changes nothing: the index answers."""
    name, digest = uri(), new_blob(mchannel)
    push_blob(mchannel, [name], digest)
    assert_blob_hit(fetch_blob(mchannel, [name], timeout=duration_pb2.Duration(seconds=1)), digest)
