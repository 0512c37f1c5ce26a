"""SplitBlob / SpliceBlob on a real server: the REAPI's FastCDC 2020 vectors, every status,
and the consistency of spliced blobs (FindMissingBlobs, reads assembled from chunks, eviction)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import grpc
import pytest
from server_test_helpers import OPTIONS

from casbah.digest import Digest, DigestFunction
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2, bytestream_pb2_grpc
from casbah.storage.spliced import RECORD_MIN

DATA = Path(__file__).resolve().parent.parent / "data"
IMAGE = DATA / "SekienAkashita.jpg"
FAST_CDC = re_pb2.ChunkingFunction.FAST_CDC_2020


def vectors() -> dict[int, list[tuple[int, int, str]]]:
    seeds: dict[int, list[tuple[int, int, str]]] = {}
    seed = None
    for line in (DATA / "fastcdc2020_test_vectors.txt").read_text().splitlines():
        if line.startswith("# Seed:"):
            seed = int(line.split(":")[1])
            seeds[seed] = []
        elif line and not line.startswith("#") and seed is not None:
            offset, length, sha, _ = line.split("\t")
            seeds[seed].append((int(offset), int(length), sha))
    return seeds


@pytest.fixture(scope="module")
def server(module_server_factory, tmp_path_factory):
    config = tmp_path_factory.mktemp("config") / "casbah.yaml"
    config.write_text(
        "storages:\n  small: {kind: memory, max-size: 3M}\n"
        "instances:\n"
        '  "": {chunking: {avg-chunk-size: 16K}}\n'
        "  seed666: {chunking: {avg-chunk-size: 16K, seed: 666}}\n"
        "  default: {}\n"
        "  small: {storage: small, chunking: {avg-chunk-size: 16K}}\n"
    )
    return module_server_factory(["--config", str(config)])


@pytest.fixture(scope="module")
def cas(server):
    with grpc.insecure_channel(server.address, options=OPTIONS) as ch:
        yield re_grpc.ContentAddressableStorageStub(ch), bytestream_pb2_grpc.ByteStreamStub(ch), ch


def _d(digest: Digest) -> re_pb2.Digest:
    return re_pb2.Digest(hash=digest.hash, size_bytes=digest.size)


def upload(stub, blobs: list[bytes], instance: str = "", function=DigestFunction.SHA256) -> list[Digest]:
    digests = [Digest.of(b, function) for b in blobs]
    response = stub.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest(
        instance_name=instance, digest_function=function.proto_value,
        requests=[re_pb2.BatchUpdateBlobsRequest.Request(digest=_d(d), data=b)
                  for d, b in zip(digests, blobs, strict=True)]))
    assert all(r.status.code == 0 for r in response.responses), response
    return digests


def missing(stub, digests: list[Digest], instance: str = "", function=DigestFunction.SHA256) -> set[str]:
    response = stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        instance_name=instance, digest_function=function.proto_value, blob_digests=[_d(d) for d in digests]))
    return {d.hash for d in response.missing_blob_digests}


def splice(stub, blob: Digest, chunks: list[Digest], instance: str = "", function=DigestFunction.SHA256):
    return stub.SpliceBlob(re_pb2.SpliceBlobRequest(
        instance_name=instance, blob_digest=_d(blob), chunk_digests=[_d(c) for c in chunks],
        digest_function=function.proto_value, chunking_function=FAST_CDC))


def bs_read(bs, blob: Digest, instance: str = "", offset: int = 0, limit: int = 0) -> bytes:
    segment = "" if blob.function is DigestFunction.SHA256 else f"{blob.function.value}/"
    name = f"{instance + '/' if instance else ''}blobs/{segment}{blob.hash}/{blob.size}"
    return b"".join(r.data for r in bs.Read(bytestream_pb2.ReadRequest(resource_name=name, read_offset=offset,
                                                                        read_limit=limit)))


@pytest.mark.parametrize("instance,seed", [("", 0), ("seed666", 666)])
def test_split_answers_the_published_fastcdc_vectors(cas, instance, seed):
    stub = cas[0]
    image = IMAGE.read_bytes()
    (blob,) = upload(stub, [image], instance)
    response = stub.SplitBlob(re_pb2.SplitBlobRequest(instance_name=instance, blob_digest=_d(blob),
                                                      chunking_function=FAST_CDC))
    assert response.chunking_function == FAST_CDC
    expected = vectors()[seed]
    assert [(c.hash, c.size_bytes) for c in response.chunk_digests] == [(sha, n) for _, n, sha in expected]
    # every chunk is in CAS, with the right bytes
    assert not missing(stub, [Digest(c.hash, c.size_bytes) for c in response.chunk_digests], instance)
    read = stub.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(instance_name=instance,
                                                            digests=response.chunk_digests[:2]))
    offset = expected[1][0]
    assert read.responses[1].data == image[offset:offset + expected[1][1]]


def test_capabilities_advertise_split_splice_and_the_instance_params(cas):
    ch = cas[2]
    caps = re_grpc.CapabilitiesStub(ch)
    default = caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="default")).cache_capabilities
    assert default.split_blob_support and default.splice_blob_support
    assert default.fast_cdc_2020_params.avg_chunk_size_bytes == 512 * 1024
    assert default.fast_cdc_2020_params.seed == 0
    assert not default.HasField("rep_max_cdc_params")
    other = caps.GetCapabilities(re_pb2.GetCapabilitiesRequest(instance_name="seed666")).cache_capabilities
    assert (other.fast_cdc_2020_params.avg_chunk_size_bytes, other.fast_cdc_2020_params.seed) == (16384, 666)


@pytest.mark.parametrize("function", [DigestFunction.SHA256, DigestFunction.BLAKE3, DigestFunction.SHA512])
def test_spliced_blob_is_present_and_read_from_its_chunks(cas, function):
    stub, bs, _ = cas
    parts = [os.urandom(5000), os.urandom(70000), os.urandom(3)]
    blob_bytes = b"".join(parts)
    chunks = upload(stub, parts, function=function)
    blob = Digest.of(blob_bytes, function)
    assert missing(stub, [blob], function=function) == {blob.hash}
    response = splice(stub, blob, chunks, function=function)
    assert response.blob_digest.hash == blob.hash
    assert not missing(stub, [blob], function=function)
    assert bs_read(bs, blob) == blob_bytes
    assert bs_read(bs, blob, offset=4000, limit=2000) == blob_bytes[4000:6000]
    assert bs_read(bs, blob, offset=75000) == blob_bytes[75000:]
    batch = stub.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digest_function=function.proto_value,
                                                             digests=[_d(blob)]))
    assert batch.responses[0].status.code == 0 and batch.responses[0].data == blob_bytes
    # SplitBlob of a spliced blob answers its recorded list
    split = stub.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=_d(blob), digest_function=function.proto_value))
    assert [c.hash for c in split.chunk_digests] == [c.hash for c in chunks]


def test_get_tree_of_a_spliced_directory(cas):
    stub = cas[0]
    file_digest = Digest.of(b"x")
    root = re_pb2.Directory(files=[re_pb2.FileNode(name=f"f{i:05d}", digest=_d(file_digest)) for i in range(3000)])
    data = root.SerializeToString(deterministic=True)
    chunks = upload(stub, [data[:40000], data[40000:]])
    digest = Digest.of(data)
    splice(stub, digest, chunks)
    pages = list(stub.GetTree(re_pb2.GetTreeRequest(root_digest=_d(digest))))
    assert pages[0].directories[0] == root


def test_splice_missing_chunk_is_not_found_naming_it(cas):
    stub = cas[0]
    present, absent = os.urandom(100), os.urandom(100)
    (chunk,) = upload(stub, [present])
    gone = Digest.of(absent)
    with pytest.raises(grpc.RpcError) as err:
        splice(stub, Digest.of(present + absent), [chunk, gone])
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert gone.hash in err.value.details()


def test_splice_wrong_concatenation_is_invalid_argument_and_stores_nothing(cas):
    stub = cas[0]
    a, b = os.urandom(1000), os.urandom(1000)
    chunks = upload(stub, [a, b])
    claimed = Digest(hashlib.sha256(b + a).hexdigest(), 2000)  # right size, wrong order
    with pytest.raises(grpc.RpcError) as err:
        splice(stub, claimed, chunks)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing(stub, [claimed]) == {claimed.hash}
    with pytest.raises(grpc.RpcError) as err:  # wrong total size
        splice(stub, Digest(claimed.hash, 1999), chunks)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_splice_of_a_blob_kept_as_another_chunk_list_is_already_exists(cas):
    stub = cas[0]
    data = os.urandom(RECORD_MIN + 3000)
    first = upload(stub, [data[:1000], data[1000:]])
    second = upload(stub, [data[:2000], data[2000:]])
    blob = Digest.of(data)
    splice(stub, blob, first)
    splice(stub, blob, first)  # the same list again: fine
    with pytest.raises(grpc.RpcError) as err:
        splice(stub, blob, second)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_a_small_spliced_blob_is_stored_whole_and_found_without_a_record(cas):
    """At most RECORD_MIN bytes: assembled and stored whole (FindMissingBlobs never asks
    the split index about such digests); another correct chunk list is then simply OK."""
    stub = cas[0]
    data = os.urandom(3000)
    first = upload(stub, [data[:1000], data[1000:]])
    second = upload(stub, [data[:2000], data[2000:]])
    blob = Digest.of(data)
    splice(stub, blob, first)
    splice(stub, blob, second)  # stored whole: any correct list is fine
    assert missing(stub, [blob]) == set()
    response = stub.BatchReadBlobs(re_pb2.BatchReadBlobsRequest(digests=[_d(blob)]))
    assert response.responses[0].data == data


def test_split_of_an_absent_blob_is_not_found(cas):
    stub = cas[0]
    with pytest.raises(grpc.RpcError) as err:
        stub.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=_d(Digest.of(os.urandom(50000)))))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_split_of_a_small_blob_is_the_blob_itself(cas):
    stub = cas[0]
    (blob,) = upload(stub, [os.urandom(4096)])  # the minimum chunk size at avg 16 KiB
    response = stub.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=_d(blob)))
    assert [(c.hash, c.size_bytes) for c in response.chunk_digests] == [(blob.hash, blob.size)]


def test_lost_chunk_makes_the_spliced_blob_missing(cas):
    """A quota of 3 MiB on memory storage: uploading more evicts the oldest chunk."""
    stub, bs, _ = cas
    parts = [os.urandom(300_000) for _ in range(3)]
    chunks = upload(stub, parts, "small")
    blob = Digest.of(b"".join(parts))
    splice(stub, blob, chunks, "small")
    assert not missing(stub, [blob], "small")
    for _ in range(12):  # 3.6 MB more than the chunks: the oldest go
        upload(stub, [os.urandom(300_000)], "small")
    assert missing(stub, chunks, "small")
    assert missing(stub, [blob], "small") == {blob.hash}
    with pytest.raises(grpc.RpcError) as err:
        bs_read(bs, blob, "small")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        stub.SplitBlob(re_pb2.SplitBlobRequest(instance_name="small", blob_digest=_d(blob)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("function", [DigestFunction.GITSHA1, DigestFunction.SHA256TREE])
def test_split_of_a_whole_blob_under_other_digest_functions(cas, function):
    """The cut points are the vectors' (they do not depend on the hash); the chunk
    digests are the request's function over the same slices, and each chunk is in CAS."""
    stub = cas[0]
    image = IMAGE.read_bytes()
    (blob,) = upload(stub, [image], function=function)
    response = stub.SplitBlob(re_pb2.SplitBlobRequest(blob_digest=_d(blob), digest_function=function.proto_value))
    expected = [Digest.of(image[o:o + n], function) for o, n, _ in vectors()[0]]
    assert [(c.hash, c.size_bytes) for c in response.chunk_digests] == [(d.hash, d.size) for d in expected]
    assert not missing(stub, expected, function=function)


def test_spliced_blobs_in_a_large_find_missing_batch(cas):
    """A batch of 16 and more takes the array path (server/wire.py, digest_batch.py): the
    spliced blobs among large absent digests are found by their records, in order."""
    stub, _, _ = cas
    spliced = []
    for _ in range(3):
        parts = [os.urandom(40_000), os.urandom(50_000)]
        chunks = upload(stub, parts)
        blob = Digest.of(b"".join(parts))
        splice(stub, blob, chunks)
        spliced.append(blob)
    absent = [Digest.of(os.urandom(32))._replace(size=size) for size in range(100_000, 100_040)]
    query = absent[:10] + spliced[:2] + absent[10:30] + spliced[2:] + absent[30:]
    response = stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest(blob_digests=[_d(d) for d in query]))
    assert [(d.hash, d.size_bytes) for d in response.missing_blob_digests] == [(d.hash, d.size) for d in absent]
