"""ContentAddressableStorage over real gRPC: FindMissingBlobs, batch calls and GetTree.

These are the calls BuildStream (via buildbox-casd) makes for every artifact, and
FindMissingBlobs is the first thing Bazel asks per action; a wrong answer here
means either re-uploading everything or trusting blobs that are not there.
"""

from __future__ import annotations

import grpc
import pytest
import zstandard
from server_test_helpers import (
    BLAKE3,
    IDENTITY,
    INVALID_ARGUMENT,
    NOT_FOUND,
    OK,
    SHA256,
    ZSTD,
    b3,
    cas,
    key,
    missing,
    peak_rss,
    rand,
    rpc_error,
    sha,
    update_request,
    upload,
    zstd_bomb,
    zstd_frames,
)

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

EMPTY_SHA = sha(b"")
EMPTY_B3 = b3(b"")


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def batch_read(channel: grpc.Channel, digests: list[re_pb2.Digest], function: int = 0,
               compressors: tuple[int, ...] = ()) -> list[re_pb2.BatchReadBlobsResponse.Response]:
    response = cas(channel).BatchReadBlobs(re_pb2.BatchReadBlobsRequest(
        digests=digests, digest_function=function, acceptable_compressors=compressors))
    assert [key(r.digest) for r in response.responses] == [key(d) for d in digests]
    return list(response.responses)


# -- FindMissingBlobs ----------------------------------------------------------------


def test_find_missing_present_and_absent(mchannel) -> None:
    """Only absent digests come back, whatever their position in the request."""
    present = upload(mchannel, [rand(100), rand(5000)])
    absent = [sha(rand(100)), sha(rand(7))]
    request = [absent[0], present[0], absent[1], present[1]]
    assert missing(mchannel, request) == {key(d) for d in absent}
    assert missing(mchannel, request, SHA256) == {key(d) for d in absent}


def test_empty_blob_is_never_missing(mchannel) -> None:
    """Bazel and BuildStream ask for the empty blob without ever uploading it."""
    assert missing(mchannel, [EMPTY_SHA]) == set()
    assert missing(mchannel, [EMPTY_B3], BLAKE3) == set()
    # Size 0 with some other hash is not the empty blob.
    bogus = re_pb2.Digest(hash="0" * 64, size_bytes=0)
    assert missing(mchannel, [bogus]) == {key(bogus)}


def test_empty_requests_succeed(mchannel) -> None:
    """BuildStream 1.x probes batch support with empty BatchRead/BatchUpdate requests."""
    stub = cas(mchannel)
    assert not stub.FindMissingBlobs(re_pb2.FindMissingBlobsRequest()).missing_blob_digests
    assert not stub.BatchUpdateBlobs(re_pb2.BatchUpdateBlobsRequest()).responses
    assert not stub.BatchReadBlobs(re_pb2.BatchReadBlobsRequest()).responses


def test_blake3_digest_function_is_honoured(mchannel) -> None:
    """A BLAKE3 blob is not a SHA256 blob with the same hex, and vice versa.

    Both hashes are 64 hex characters, so only `digest_function` tells them apart;
    confusing them would serve a client bytes that do not hash to what it asked for.
    """
    data_b3, data_sha = rand(300), rand(300)
    (d_b3,) = upload(mchannel, [data_b3], BLAKE3)
    (d_sha,) = upload(mchannel, [data_sha], SHA256)
    assert d_b3 == b3(data_b3)
    assert missing(mchannel, [d_b3], BLAKE3) == set()
    assert missing(mchannel, [d_b3], SHA256) == {key(d_b3)}
    assert missing(mchannel, [d_b3]) == {key(d_b3)}  # unset means SHA256
    assert missing(mchannel, [d_sha], SHA256) == set()
    assert missing(mchannel, [d_sha], BLAKE3) == {key(d_sha)}
    # The same bytes uploaded under both functions are two blobs, both readable.
    upload(mchannel, [data_b3], SHA256)
    assert missing(mchannel, [sha(data_b3)]) == set()
    [r] = batch_read(mchannel, [d_b3], BLAKE3)
    assert (r.status.code, r.data) == (OK, data_b3)
    [r] = batch_read(mchannel, [d_sha], BLAKE3)
    assert r.status.code == NOT_FOUND


@pytest.mark.parametrize("bad", [
    re_pb2.Digest(hash="ABCDEF" + "0" * 58, size_bytes=1),  # uppercase
    re_pb2.Digest(hash="0" * 63, size_bytes=1),  # short
    re_pb2.Digest(hash="0" * 65, size_bytes=1),  # long
    re_pb2.Digest(hash="g" * 64, size_bytes=1),  # not hex
    re_pb2.Digest(hash="", size_bytes=0),
    re_pb2.Digest(hash="0" * 64, size_bytes=-1),
], ids=["upper", "short", "long", "nonhex", "empty", "negative"])
def test_find_missing_malformed_digest(mchannel, bad: re_pb2.Digest) -> None:
    """A malformed digest is the client's bug: INVALID_ARGUMENT, never a 'missing' answer."""
    error = rpc_error(lambda: cas(mchannel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(blob_digests=[sha(b"x"), bad])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_digest_function_is_rejected(mchannel) -> None:
    """SHA1 (and the rest) are not advertised, so a request using one is refused, not misread."""
    error = rpc_error(lambda: cas(mchannel).FindMissingBlobs(re_pb2.FindMissingBlobsRequest(
        blob_digests=[sha(b"x")], digest_function=re_pb2.DigestFunction.SHA1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


# -- BatchUpdateBlobs ----------------------------------------------------------------


def test_batch_update_per_blob_statuses(mchannel) -> None:
    """A bad blob fails alone: its neighbours are stored, it is not (not even under its real digest)."""
    good1, good2, wrong_hash, wrong_size, long_ = rand(1000), rand(2000), rand(300), rand(400), rand(50)
    claimed = sha(rand(300))  # a digest whose data is never sent
    digests = [sha(good1), claimed, re_pb2.Digest(hash=sha(wrong_size).hash, size_bytes=401),
               re_pb2.Digest(hash=sha(long_).hash, size_bytes=49), sha(good2)]
    response = cas(mchannel).BatchUpdateBlobs(
        update_request([good1, wrong_hash, wrong_size, long_, good2], digests))
    codes = [r.status.code for r in response.responses]
    assert codes == [OK, INVALID_ARGUMENT, INVALID_ARGUMENT, INVALID_ARGUMENT, OK]
    assert [key(r.digest) for r in response.responses] == [key(d) for d in digests]
    assert all(r.status.message for r in response.responses[1:4])
    never_stored = [claimed, sha(wrong_hash), digests[2], sha(wrong_size), digests[3], sha(long_)]
    assert missing(mchannel, [*digests, *never_stored]) == {key(d) for d in never_stored}
    reads = batch_read(mchannel, [digests[0], *never_stored, digests[4]])
    assert [r.status.code for r in reads] == [OK] + [NOT_FOUND] * len(never_stored) + [OK]
    assert (reads[0].data, reads[-1].data) == (good1, good2)


def test_batch_update_malformed_digest_fails_that_blob(mchannel) -> None:
    """A malformed digest in a batch is reported on its own slot; the rest of the batch is stored."""
    good = rand(64)
    response = cas(mchannel).BatchUpdateBlobs(update_request(
        [b"abc", good], [re_pb2.Digest(hash="XYZ", size_bytes=3), sha(good)]))
    assert [r.status.code for r in response.responses] == [INVALID_ARGUMENT, OK]
    assert missing(mchannel, [sha(good)]) == set()


def test_batch_update_same_blob_twice(mchannel) -> None:
    """A client may list one blob twice in a batch (two outputs with equal content): both slots succeed."""
    data = rand(777)
    response = cas(mchannel).BatchUpdateBlobs(update_request([data, data]))
    assert [r.status.code for r in response.responses] == [OK, OK]
    [r] = batch_read(mchannel, [sha(data)])
    assert r.data == data


def test_batch_update_empty_blob(mchannel) -> None:
    """Uploading the empty blob is accepted (and it stays readable)."""
    response = cas(mchannel).BatchUpdateBlobs(update_request([b""]))
    assert [r.status.code for r in response.responses] == [OK]
    response = cas(mchannel).BatchUpdateBlobs(update_request([b""], function=BLAKE3))
    assert [r.status.code for r in response.responses] == [OK]


def test_batch_update_zstd(mchannel) -> None:
    """zstd batch uploads (advertised in supported_batch_update_compressors) store the uncompressed blob."""
    text = b"casbah " * 4000 + rand(16)
    small = rand(10)
    cctx = zstandard.ZstdCompressor()
    request = update_request([cctx.compress(text), cctx.compress(small), cctx.compress(b"")],
                             [sha(text), sha(small), EMPTY_SHA], compressor=ZSTD)
    response = cas(mchannel).BatchUpdateBlobs(request)
    assert [r.status.code for r in response.responses] == [OK, OK, OK]
    reads = batch_read(mchannel, [sha(text), sha(small)])
    assert [r.data for r in reads] == [text, small]


def test_batch_update_zstd_bad_data(mchannel) -> None:
    """Corrupt zstd, or zstd of other bytes, fails that blob with INVALID_ARGUMENT and stores nothing."""
    blob, other = rand(500), rand(500)
    cctx = zstandard.ZstdCompressor()
    digests = [sha(blob), sha(blob), sha(blob)]
    request = update_request([b"not zstd at all", cctx.compress(other), cctx.compress(blob + b"x")], digests,
                             compressor=ZSTD)
    response = cas(mchannel).BatchUpdateBlobs(request)
    assert [r.status.code for r in response.responses] == [INVALID_ARGUMENT] * 3
    assert missing(mchannel, [sha(blob), sha(other)]) == {key(sha(blob)), key(sha(other))}


def test_batch_update_zstd_multiple_frames(mchannel) -> None:
    """Concatenated zstd frames are one valid zstd stream: every frame is decoded, not just the first."""
    data = b"frames " * 20_000 + rand(100)
    response = cas(mchannel).BatchUpdateBlobs(update_request([zstd_frames(data)], [sha(data)], compressor=ZSTD))
    assert [r.status.code for r in response.responses] == [OK]
    [r] = batch_read(mchannel, [sha(data)])
    assert r.data == data


def test_batch_update_zstd_bomb(mserver, mchannel) -> None:
    """32 KiB of zstd that expands to 1 GiB, claiming a 100-byte blob: refused without expanding it all."""
    before = peak_rss(mserver.pid)
    claimed = sha(b"x" * 100)
    response = cas(mchannel).BatchUpdateBlobs(update_request([zstd_bomb(1 << 30)], [claimed], compressor=ZSTD))
    assert [r.status.code for r in response.responses] == [INVALID_ARGUMENT]
    assert peak_rss(mserver.pid) - before < 256 << 20
    assert missing(mchannel, [claimed]) == {key(claimed)}


def test_batch_update_zstd_claiming_huge_blob(mserver, mchannel) -> None:
    """A small zstd payload claiming a huge blob could make the server allocate gigabytes: the call is refused."""
    before = peak_rss(mserver.pid)
    claimed = re_pb2.Digest(hash=sha(b"y").hash, size_bytes=1 << 30)
    error = rpc_error(lambda: cas(mchannel).BatchUpdateBlobs(
        update_request([zstd_bomb(1 << 30)], [claimed], compressor=ZSTD)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ByteStream" in error.details()
    assert peak_rss(mserver.pid) - before < 256 << 20


def test_batch_update_unsupported_compressor(mchannel) -> None:
    """A compressor casbah does not advertise is refused for that blob, not stored as garbage."""
    blob = rand(100)
    response = cas(mchannel).BatchUpdateBlobs(update_request([blob], compressor=re_pb2.Compressor.DEFLATE))
    assert [r.status.code for r in response.responses] == [INVALID_ARGUMENT]
    assert missing(mchannel, [sha(blob)]) == {key(sha(blob))}


# -- BatchReadBlobs ------------------------------------------------------------------


def test_batch_read_per_blob_not_found(mchannel) -> None:
    """Absent blobs get NOT_FOUND in their slot; present ones (and the empty blob) are served."""
    a, b = rand(10), rand(20_000)
    upload(mchannel, [a, b])
    absent = sha(rand(33))
    reads = batch_read(mchannel, [sha(a), absent, EMPTY_SHA, sha(b)])
    assert [r.status.code for r in reads] == [OK, NOT_FOUND, OK, OK]
    assert [r.data for r in reads] == [a, b"", b"", b]
    assert [r.compressor for r in reads] == [IDENTITY] * 4


def test_batch_read_empty_blob_blake3(mchannel) -> None:
    """The empty blob exists under every digest function without being uploaded."""
    [r] = batch_read(mchannel, [EMPTY_B3], BLAKE3)
    assert (r.status.code, r.data) == (OK, b"")


def test_batch_read_zstd(mchannel) -> None:
    """With zstd acceptable, compressible blobs come back zstd-compressed and decompress to the blob."""
    text = b"all work and no play " * 2000
    noise = rand(3000)
    upload(mchannel, [text, noise])
    reads = batch_read(mchannel, [sha(text), sha(noise), EMPTY_SHA], compressors=(ZSTD,))
    assert [r.status.code for r in reads] == [OK, OK, OK]
    assert reads[0].compressor == ZSTD
    assert len(reads[0].data) < len(text) // 10
    for r, blob in zip(reads, [text, noise, b""], strict=True):
        assert r.compressor in (ZSTD, IDENTITY)
        assert (unzstd(r.data) if r.compressor == ZSTD else r.data) == blob


# -- GetTree -------------------------------------------------------------------------


def directory(*children: tuple[str, re_pb2.Digest], files: tuple[tuple[str, re_pb2.Digest], ...] = ()
              ) -> re_pb2.Directory:
    return re_pb2.Directory(
        directories=[re_pb2.DirectoryNode(name=n, digest=d) for n, d in sorted(children, key=lambda c: c[0])],
        files=[re_pb2.FileNode(name=n, digest=d) for n, d in files],
    )


def make_tree(channel: grpc.Channel, function: int = SHA256) -> tuple[re_pb2.Digest, set[tuple[str, int]]]:
    """Upload a 3-level tree of 50 distinct directories; return the root digest and all their digests.

    Root -> 7 children (plus a second entry pointing at child 0: a repeated subtree);
    each child -> 6 grandchildren (child 0 has the empty directory, child 1 also
    names one of child 0's grandchildren).  The empty directory is never uploaded.
    """
    digest = b3 if function == BLAKE3 else sha
    salt = rand(8).hex()
    blobs: dict[tuple[str, int], bytes] = {}

    def add(d: re_pb2.Directory) -> re_pb2.Digest:
        data = d.SerializeToString(deterministic=True)
        dg = digest(data)
        if data:
            blobs[key(dg)] = data
        return dg

    all_digests: set[tuple[str, int]] = set()
    children = []
    first_grandchild = None
    for i in range(7):
        grandchildren = []
        for j in range(6):
            if i == 0 and j == 0:
                g = add(re_pb2.Directory())
            else:
                g = add(directory(files=((f"f-{salt}-{i}-{j}", digest(f"{salt}{i}{j}".encode())),)))
            if i == 0 and j == 1:
                first_grandchild = g
            grandchildren.append((f"g{j}", g))
            all_digests.add(key(g))
        if i == 1:
            grandchildren.append(("shared", first_grandchild))
        c = add(directory(*grandchildren, files=((f"c{i}-{salt}", digest(salt.encode())),)))
        children.append((f"c{i}", c))
        all_digests.add(key(c))
    children.append(("again", children[0][1]))
    root = add(directory(*children))
    all_digests.add(key(root))
    assert len(all_digests) == 50
    datas = list(blobs.values())
    upload(channel, datas, function)
    return root, all_digests


def get_tree(channel: grpc.Channel, root: re_pb2.Digest, page_size: int = 0, page_token: str = "",
             function: int = 0) -> list[re_pb2.GetTreeResponse]:
    return list(cas(channel).GetTree(re_pb2.GetTreeRequest(
        root_digest=root, page_size=page_size, page_token=page_token, digest_function=function), timeout=30))


def tree_digests(pages: list[re_pb2.GetTreeResponse], function: int = SHA256) -> list[tuple[str, int]]:
    digest = b3 if function == BLAKE3 else sha
    return [key(digest(d.SerializeToString(deterministic=True))) for p in pages for d in p.directories]


def test_get_tree_whole(mchannel) -> None:
    """Every directory once, root first; the last page has no token."""
    root, expected = make_tree(mchannel)
    pages = get_tree(mchannel, root)
    got = tree_digests(pages)
    assert got[0] == key(root)
    assert len(got) == len(set(got)) == 50
    assert set(got) == expected
    assert pages[-1].next_page_token == ""
    assert re_pb2.Directory() in [d for p in pages for d in p.directories]


def test_get_tree_paging(mchannel) -> None:
    """page_size bounds each page; every page but the last carries a token."""
    root, expected = make_tree(mchannel)
    pages = get_tree(mchannel, root, page_size=7)
    assert len(pages) == 8  # ceil(50 / 7)
    assert all(len(p.directories) <= 7 for p in pages)
    assert all(p.next_page_token for p in pages[:-1]) and not pages[-1].next_page_token
    got = tree_digests(pages)
    assert len(got) == 50 and set(got) == expected


def test_get_tree_resume_from_token(mchannel) -> None:
    """A client that stops after one page and calls again with its token gets exactly the rest."""
    root, expected = make_tree(mchannel)
    stream = cas(mchannel).GetTree(re_pb2.GetTreeRequest(root_digest=root, page_size=10), timeout=30)
    first = next(stream)
    stream.cancel()
    assert len(first.directories) == 10 and first.next_page_token
    rest = get_tree(mchannel, root, page_size=15, page_token=first.next_page_token)
    got = tree_digests([first, *rest])
    assert len(got) == 50 and set(got) == expected
    # The token can be used again (a retried call), with another page size.
    again = get_tree(mchannel, root, page_token=first.next_page_token)
    assert tree_digests(again) == got[10:]


def test_get_tree_blake3(mchannel) -> None:
    """GetTree follows child digests with the request's digest function."""
    root, expected = make_tree(mchannel, BLAKE3)
    got = tree_digests(get_tree(mchannel, root, function=BLAKE3), BLAKE3)
    assert set(got) == expected
    error = rpc_error(lambda: get_tree(mchannel, root))  # the same hash as SHA256 is another (absent) blob
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_get_tree_missing_subtree_is_omitted(mchannel) -> None:
    """A missing subdirectory is skipped silently (REAPI), the rest of the tree is returned."""
    leaf = directory(files=(("f", sha(rand(4))),))
    absent = directory(("leaf", upload(mchannel, [leaf.SerializeToString()])[0]), files=(("x", sha(rand(3))),))
    present = directory(files=(("y", sha(rand(5))),))
    root = directory(("absent", sha(absent.SerializeToString())), ("present", sha(present.SerializeToString())))
    upload(mchannel, [present.SerializeToString(), root.SerializeToString()])
    got = tree_digests(get_tree(mchannel, sha(root.SerializeToString())))
    assert got == [key(sha(root.SerializeToString())), key(sha(present.SerializeToString()))]


def test_get_tree_negative_page_size(mchannel) -> None:
    root, _ = make_tree(mchannel)
    error = rpc_error(lambda: get_tree(mchannel, root, page_size=-1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_tree_missing_root(mchannel) -> None:
    error = rpc_error(lambda: get_tree(mchannel, sha(rand(40))))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_get_tree_empty_root(mchannel) -> None:
    """The empty Directory exists without upload, so its tree is one empty Directory."""
    pages = get_tree(mchannel, EMPTY_SHA)
    assert [list(p.directories) for p in pages] == [[re_pb2.Directory()]]


@pytest.mark.parametrize("token", ["garbage", "!!!", "MTpmb286Mg=="])
def test_get_tree_bad_page_token(mchannel, token: str) -> None:
    root, _ = make_tree(mchannel)
    error = rpc_error(lambda: get_tree(mchannel, root, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_get_tree_token_of_another_tree(mchannel) -> None:
    """A token is bound to its root: using it for another tree is INVALID_ARGUMENT, not a wrong page."""
    root1, _ = make_tree(mchannel)
    root2, _ = make_tree(mchannel)
    token = get_tree(mchannel, root1, page_size=5)[0].next_page_token
    error = rpc_error(lambda: get_tree(mchannel, root2, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_unknown_instance(mchannel) -> None:
    error = rpc_error(lambda: cas(mchannel).FindMissingBlobs(
        re_pb2.FindMissingBlobsRequest(instance_name="nope", blob_digests=[sha(b"x")])))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
