"""ByteStream over real gRPC: reads, verified and resumable writes, resource names, compression.

Bazel moves every blob through ByteStream (16 KiB write chunks, resumes broken
uploads from QueryWriteStatus), and buildbox-casd uses it for every blob too big
for a batch, so these tests speak the protocol as those clients do.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import zstandard
from server_test_helpers import (
    BLAKE3,
    b3,
    bs,
    bs_read,
    bs_write,
    key,
    missing,
    peak_rss,
    rand,
    read_name,
    rpc_error,
    sha,
    upload,
    write_name,
    write_requests,
    zstd_bomb,
    zstd_frames,
)

from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2

MiB = 1 << 20
EMPTY = sha(b"")


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)


def query(channel: grpc.Channel, name: str) -> bs_pb2.QueryWriteStatusResponse:
    return bs(channel).QueryWriteStatus(bs_pb2.QueryWriteStatusRequest(resource_name=name), timeout=10)


def code(call) -> grpc.StatusCode:
    return rpc_error(call).code()


@pytest.fixture(scope="module")
def big_blob(mchannel) -> tuple[bytes, object]:
    """A stored 3 MiB blob: larger than one storage chunk (1 MiB), so reads span several messages."""
    data = rand(3 * MiB)
    name = write_name(sha(data))
    assert bs_write(mchannel, name, data, chunk=MiB).committed_size == len(data)
    return data, sha(data)


# -- Read ----------------------------------------------------------------------------


def test_read_full(mchannel, big_blob) -> None:
    data, digest = big_blob
    responses = list(bs(mchannel).Read(bs_pb2.ReadRequest(resource_name=read_name(digest))))
    assert b"".join(r.data for r in responses) == data
    assert len(responses) > 1 and max(len(r.data) for r in responses) <= 2 * MiB


def test_read_large_blob_with_default_client_limits(mserver) -> None:
    """Read responses stay under a default client's 4 MiB message limit, whatever the blob size."""
    data = rand(10 * MiB)
    with grpc.insecure_channel(mserver.address) as channel:  # default limits
        name = write_name(sha(data))
        assert bs_write(channel, name, data, chunk=MiB).committed_size == len(data)
        assert bs_read(channel, read_name(sha(data))) == data


@pytest.mark.parametrize(("offset", "limit"), [
    (0, 0), (0, 1), (100, 50), (MiB - 10, 20), (MiB, MiB), (5, 3 * MiB), (3 * MiB - 1, 0), (2 * MiB + 7, 10),
])
def test_read_offset_and_limit(mchannel, big_blob, offset: int, limit: int) -> None:
    """read_limit 0 means to the end; a limit past the end is cut at the end."""
    data, digest = big_blob
    expected = data[offset:offset + limit] if limit else data[offset:]
    assert bs_read(mchannel, read_name(digest), offset, limit) == expected


def test_read_offset_at_end_is_empty(mchannel, big_blob) -> None:
    data, digest = big_blob
    assert bs_read(mchannel, read_name(digest), len(data)) == b""


def test_read_bad_ranges(mchannel, big_blob) -> None:
    data, digest = big_blob
    name = read_name(digest)
    assert code(lambda: bs_read(mchannel, name, len(data) + 1)) == grpc.StatusCode.OUT_OF_RANGE
    assert code(lambda: bs_read(mchannel, name, -1)) == grpc.StatusCode.OUT_OF_RANGE
    assert code(lambda: bs_read(mchannel, name, 0, -1)) == grpc.StatusCode.INVALID_ARGUMENT


def test_read_not_found(mchannel) -> None:
    assert code(lambda: bs_read(mchannel, read_name(sha(rand(10))))) == grpc.StatusCode.NOT_FOUND


def test_read_empty_blob_never_uploaded(mchannel) -> None:
    """The empty blob reads as no data, under both digest functions, never NOT_FOUND."""
    assert bs_read(mchannel, read_name(EMPTY)) == b""
    assert bs_read(mchannel, read_name(b3(b""), function="blake3")) == b""
    assert unzstd(bs_read(mchannel, read_name(EMPTY, compressor="zstd"))) == b""
    assert code(lambda: bs_read(mchannel, read_name(EMPTY), 1)) == grpc.StatusCode.OUT_OF_RANGE


# -- Write ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [16 * 1024, 1000, MiB, 0], ids=["16KiB", "odd", "1MiB", "one-message"])
def test_write_in_chunks(mchannel, chunk: int) -> None:
    """Bazel writes in 16 KiB chunks; others in 1 MiB or in one message.  All store the blob intact."""
    data = rand(MiB + 12345)
    response = bs_write(mchannel, write_name(sha(data)), data, chunk=chunk)
    assert response.committed_size == len(data)
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_write_tiny_blob_like_bazel(mchannel) -> None:
    """Bazel sends even a 12-byte blob through ByteStream."""
    data = b"hello world\n" + rand(4)
    assert bs_write(mchannel, write_name(sha(data)), data).committed_size == len(data)
    assert missing(mchannel, [sha(data)]) == set()


def test_write_resource_name_repeated_on_every_message(mchannel) -> None:
    """Some clients repeat the (identical) resource name on every request: allowed."""
    data = rand(100_000)
    name = write_name(sha(data))
    requests = [bs_pb2.WriteRequest(resource_name=name, write_offset=r.write_offset, data=r.data,
                                    finish_write=r.finish_write) for r in write_requests(name, data)]
    assert bs(mchannel).Write(iter(requests)).committed_size == len(data)
    other = rand(100_000)
    requests = [bs_pb2.WriteRequest(resource_name=r.resource_name, write_offset=r.write_offset, data=r.data,
                                    finish_write=r.finish_write) for r in write_requests(write_name(sha(other)), other)]
    requests[2].resource_name = write_name(sha(other))  # another upload id: not allowed mid-stream
    assert code(lambda: bs(mchannel).Write(iter(requests))) == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("chunk", [0, 16 * 1024], ids=["one-message", "chunked"])
def test_write_bad_hash(mchannel, chunk: int) -> None:
    """Data that does not hash to the digest: INVALID_ARGUMENT (not retryable) and nothing stored."""
    data = rand(50_000)
    claimed = sha(rand(50_000))
    name = write_name(claimed)
    assert code(lambda: bs_write(mchannel, name, data, chunk)) == grpc.StatusCode.INVALID_ARGUMENT
    assert missing(mchannel, [claimed, sha(data)]) == {key(claimed), key(sha(data))}
    assert code(lambda: query(mchannel, name)) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("delta", [1, -1, 20_000], ids=["longer", "shorter", "much-longer"])
@pytest.mark.parametrize("chunk", [0, 16 * 1024], ids=["one-message", "chunked"])
def test_write_bad_size(mchannel, delta: int, chunk: int) -> None:
    """More or fewer bytes than the digest names: INVALID_ARGUMENT, nothing stored."""
    data = rand(40_000)
    digest = sha(data)
    sent = data + rand(delta) if delta > 0 else data[:delta]
    name = write_name(digest)
    assert code(lambda: bs_write(mchannel, name, sent, chunk)) == grpc.StatusCode.INVALID_ARGUMENT
    assert missing(mchannel, [digest, sha(sent)]) == {key(digest), key(sha(sent))}


def test_write_empty_blob(mchannel) -> None:
    """The empty blob needs no upload: the write returns at once with committed_size 0."""
    assert bs_write(mchannel, write_name(EMPTY), b"").committed_size == 0


def test_write_early_return_when_blob_exists(mchannel) -> None:
    """A Write of a stored blob ends at once with committed_size = size (REAPI), whatever the client sends."""
    data = rand(2 * MiB)
    upload(mchannel, [data[:10]])
    bs_write(mchannel, write_name(sha(data)), data, chunk=MiB)
    sent = []

    def requests():
        for r in write_requests(write_name(sha(data)), data, chunk=16 * 1024):
            sent.append(r)
            yield r

    assert bs(mchannel).Write(requests(), timeout=30).committed_size == len(data)
    assert len(sent) < 100  # the server did not wait for the 128 messages


def test_write_early_return_compressed(mchannel) -> None:
    """For a compressed write of a stored blob, committed_size is -1 (REAPI)."""
    data = b"compress me " * 10_000 + rand(8)
    upload(mchannel, [data])
    packed = zstandard.ZstdCompressor().compress(data)
    response = bs_write(mchannel, write_name(sha(data), compressor="zstd"), packed, chunk=1000)
    assert response.committed_size == -1


def test_write_offset_gap(mchannel) -> None:
    """write_offset must be contiguous; a gap would store a blob with a hole."""
    data = rand(100)
    name = write_name(sha(data))
    requests = [bs_pb2.WriteRequest(resource_name=name, write_offset=0, data=data[:10]),
                bs_pb2.WriteRequest(write_offset=20, data=data[20:], finish_write=True)]
    assert code(lambda: bs(mchannel).Write(iter(requests))) == grpc.StatusCode.INVALID_ARGUMENT
    first = [bs_pb2.WriteRequest(resource_name=write_name(sha(data)), write_offset=5, data=data[5:],
                                 finish_write=True)]
    assert code(lambda: bs(mchannel).Write(iter(first))) == grpc.StatusCode.INVALID_ARGUMENT
    assert missing(mchannel, [sha(data)]) == {key(sha(data))}


def test_write_empty_stream(mchannel) -> None:
    assert code(lambda: bs(mchannel).Write(iter([]))) == grpc.StatusCode.INVALID_ARGUMENT


# -- compression ---------------------------------------------------------------------


def test_compressed_read(mchannel) -> None:
    """compressed-blobs/zstd reads decompress to the blob (read_offset is an uncompressed offset)."""
    data = b"zstd " * 500_000 + rand(100)  # ~2.4 MiB, several storage chunks
    bs_write(mchannel, write_name(sha(data)), data, chunk=MiB)
    name = read_name(sha(data), compressor="zstd")
    packed = bs_read(mchannel, name)
    assert len(packed) < len(data) // 10
    assert unzstd(packed) == data
    assert unzstd(bs_read(mchannel, name, offset=MiB + 3)) == data[MiB + 3:]
    assert code(lambda: bs_read(mchannel, name, 0, 10)) == grpc.StatusCode.INVALID_ARGUMENT


def test_compressed_read_incompressible(mchannel, big_blob) -> None:
    data, digest = big_blob
    assert unzstd(bs_read(mchannel, read_name(digest, compressor="zstd"))) == data


@pytest.mark.parametrize("chunk", [16 * 1024, 0], ids=["chunked", "one-message"])
def test_compressed_write(mchannel, chunk: int) -> None:
    """A zstd upload is stored under its uncompressed digest; offsets count compressed bytes."""
    data = rand(150_000).hex().encode()  # compresses about 2:1, so several 16 KiB chunks
    packed = zstandard.ZstdCompressor().compress(data)
    assert 16 * 1024 < len(packed) < len(data)
    response = bs_write(mchannel, write_name(sha(data), compressor="zstd"), packed, chunk=chunk)
    assert response.committed_size == len(packed)
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_compressed_write_wrong_content(mchannel) -> None:
    """zstd data expanding to other bytes, or to too many bytes, is INVALID_ARGUMENT and not stored."""
    data = rand(30_000)
    cctx = zstandard.ZstdCompressor()
    for wrong in (rand(30_000), data + b"!", data[:-1]):
        name = write_name(sha(data), compressor="zstd")
        assert code(lambda n=name, w=wrong: bs_write(mchannel, n, cctx.compress(w), 4096)) == \
            grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: bs_write(mchannel, write_name(sha(data), compressor="zstd"), b"garbage" * 100, 64)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert missing(mchannel, [sha(data)]) == {key(sha(data))}


@pytest.mark.parametrize("chunk", [1000, 0], ids=["chunked", "one-message"])
def test_compressed_write_multiple_frames(mchannel, chunk: int) -> None:
    """A zstd upload made of several concatenated frames is decoded whole."""
    data = rand(100_000).hex().encode()
    response = bs_write(mchannel, write_name(sha(data), compressor="zstd"), zstd_frames(data, 4), chunk=chunk)
    assert response.committed_size > 0
    assert bs_read(mchannel, read_name(sha(data))) == data


@pytest.mark.parametrize("chunk", [16 * 1024, 0], ids=["chunked", "one-message"])
def test_compressed_write_zstd_bomb(mserver, mchannel, chunk: int) -> None:
    """A zstd bomb (32 KiB expanding to 1 GiB) for a 1 MiB blob is refused without expanding it in memory."""
    before = peak_rss(mserver.pid)
    digest = sha(rand(MiB))
    name = write_name(digest, compressor="zstd")
    assert code(lambda: bs_write(mchannel, name, zstd_bomb(1 << 30), chunk=chunk)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert peak_rss(mserver.pid) - before < 256 << 20
    assert missing(mchannel, [digest]) == {key(digest)}


def test_compressed_unsupported_compressor(mchannel, big_blob) -> None:
    _, digest = big_blob
    for compressor in ("deflate", "brotli", "gzip", "identity"):
        assert code(lambda c=compressor: bs_read(mchannel, read_name(digest, compressor=c))) == \
            grpc.StatusCode.INVALID_ARGUMENT


# -- resource names ------------------------------------------------------------------


def test_multi_segment_instance(mchannel) -> None:
    """An instance name with slashes (`a/b/c`) is parsed by keyword, not by position."""
    data = rand(70_000)
    digest = sha(data)
    assert bs_write(mchannel, write_name(digest, instance="a/b/c"), data).committed_size == len(data)
    assert bs_read(mchannel, read_name(digest, instance="a/b/c")) == data
    assert missing(mchannel, [digest], instance="a/b/c") == set()
    assert unzstd(bs_read(mchannel, read_name(digest, instance="a/b/c", compressor="zstd"))) == data
    assert query(mchannel, write_name(digest, instance="a/b/c")).complete
    for unknown in ("a/b", "a/b/c/d", "b/c"):
        assert code(lambda i=unknown: bs_read(mchannel, read_name(digest, instance=i))) == \
            grpc.StatusCode.INVALID_ARGUMENT


def test_write_with_trailing_metadata(mchannel) -> None:
    """Anything after the size in a write name is metadata to ignore (REAPI)."""
    for metadata in ("x", "some/more/segments", "blobs/uploads/42"):
        data = rand(1000)
        name = write_name(sha(data), instance="a/b/c", metadata=metadata)
        assert bs_write(mchannel, name, data).committed_size == len(data)
        assert bs_read(mchannel, read_name(sha(data))) == data
    data = b"meta " * 10_000
    name = write_name(sha(data), compressor="zstd", metadata="meta")
    assert bs_write(mchannel, name, zstandard.ZstdCompressor().compress(data)).committed_size > 0
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_blake3_in_path(mchannel) -> None:
    """`blobs/blake3/HASH/SIZE` names a BLAKE3 blob, distinct from the SHA256 blob of the same hex."""
    data = rand(80_000)
    digest = b3(data)
    name = write_name(digest, function="blake3")
    assert bs_write(mchannel, name, data).committed_size == len(data)
    assert bs_read(mchannel, read_name(digest, function="blake3")) == data
    assert missing(mchannel, [digest], BLAKE3) == set()
    assert code(lambda: bs_read(mchannel, read_name(digest))) == grpc.StatusCode.NOT_FOUND
    assert unzstd(bs_read(mchannel, read_name(digest, function="blake3", compressor="zstd"))) == data
    # Data that is right for SHA256 but not for BLAKE3 is refused under a blake3 name.
    assert code(lambda: bs_write(mchannel, write_name(sha(data), function="blake3"), data)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # Explicit sha256 in the path is accepted too.
    other = rand(100)
    assert bs_write(mchannel, write_name(sha(other), function="sha256"), other).committed_size == 100
    assert bs_read(mchannel, read_name(sha(other))) == other


H = "a" * 64
BAD_READ_NAMES = [
    "", "blobs", f"blobs/{H}", f"blobs/{H}/abc", f"blobs/{H}/-1", f"blobs/{H.upper()}/5", f"blobs/{H[:-1]}/5",
    f"blobs/{H}/5/extra", f"uploads/{uuid.uuid4()}/blobs/{H}/5", f"a//b/blobs/{H}/5", f"/blobs/{H}/5",
    f"compressed-blobs/{H}/5", f"compressed-blobs/zstd/{H}", f"blobs/sha1/{'a' * 40}/5", f"blobs/md5/{'a' * 32}/5",
    f"blobs/vso/{H}/5", f"blobs/gitsha1/{H}/5", f"actionResults/{H}/5", f"nope/blobs/{H}/5", f"blobs/blake3/{H}",
    f"blobs/{H}/\u00b2", f"blobs/{H}/\u0661\u0662", f"blobs/{H}/{'9' * 30}", f"blobs/{H}/+5", f"blobs/{H}/ 5",
]


@pytest.mark.parametrize("name", BAD_READ_NAMES)
def test_malformed_read_names(mchannel, name: str) -> None:
    assert code(lambda: bs_read(mchannel, name)) == grpc.StatusCode.INVALID_ARGUMENT


BAD_WRITE_NAMES = [
    "", f"blobs/{H}/5", f"uploads/blobs/{H}/5", f"uploads//blobs/{H}/5", f"uploads/u/blobs/{H}",
    f"uploads/u/blobs/{H}/x", f"uploads/u/{H}/5", f"uploads/u/compressed-blobs/lz4/{H}/5",
    f"nope/uploads/u/blobs/{H}/5", f"blobs/uploads/u/blobs/{H}/5",
]


@pytest.mark.parametrize("name", BAD_WRITE_NAMES)
def test_malformed_write_names(mchannel, name: str) -> None:
    data = b"12345"
    requests = [bs_pb2.WriteRequest(resource_name=name, data=data, finish_write=True)]
    assert code(lambda: bs(mchannel).Write(iter(requests))) == grpc.StatusCode.INVALID_ARGUMENT
    assert code(lambda: query(mchannel, name)) == grpc.StatusCode.INVALID_ARGUMENT


# -- QueryWriteStatus and resumable writes ---------------------------------------------


def test_query_write_status_unknown_and_complete(mchannel) -> None:
    data = rand(1000)
    name = write_name(sha(data))
    assert code(lambda: query(mchannel, name)) == grpc.StatusCode.NOT_FOUND
    bs_write(mchannel, name, data)
    status = query(mchannel, name)
    assert (status.committed_size, status.complete) == (len(data), True)
    # Any upload id for a stored blob: it is complete (a client may check before uploading).
    status = query(mchannel, write_name(sha(data)))
    assert (status.committed_size, status.complete) == (len(data), True)
    assert query(mchannel, write_name(EMPTY)).complete


def start_stream(channel: grpc.Channel, before: list[bs_pb2.WriteRequest],
                 then: list[bs_pb2.WriteRequest] = ()) -> tuple[grpc.Future, threading.Event]:
    """A Write call that sends `before`, then waits for the returned event before sending `then`."""
    release = threading.Event()

    def requests():
        yield from before
        release.wait(30)
        yield from then

    return bs(channel).Write.future(requests(), timeout=60), release


def start_partial_upload(channel: grpc.Channel, name: str, data: bytes, sent: int, chunk: int = 64 * 1024,
                         then: list[bs_pb2.WriteRequest] = ()) -> tuple[grpc.Future, threading.Event]:
    """Send `sent` bytes of an upload on a stream that stays open, without finish_write."""
    return start_stream(channel, list(write_requests(name, data[:sent], chunk=chunk, finish=False)), then)


def wait_committed(channel: grpc.Channel, name: str, at_least: int) -> bs_pb2.QueryWriteStatusResponse:
    deadline = time.monotonic() + 10
    while True:
        try:
            status = query(channel, name)
            if status.committed_size >= at_least:
                return status
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        assert time.monotonic() < deadline, "the server never reported the bytes sent"
        time.sleep(0.02)


def break_stream(channel: grpc.Channel, name: str, data: bytes, sent: int) -> int:
    """Upload part of a blob, then cancel the call as a client whose connection breaks."""
    call, release = start_partial_upload(channel, name, data, sent)
    wait_committed(channel, name, sent)
    call.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()
    status = query(channel, name)
    assert not status.complete
    assert 0 < status.committed_size <= sent
    return status.committed_size


def test_resumable_write(mchannel) -> None:
    """Bazel's resume: break the stream, ask QueryWriteStatus, continue from committed_size on a new stream."""
    data = rand(3 * MiB + 333)
    name = write_name(sha(data))
    committed = break_stream(mchannel, name, data, 2 * MiB)
    time.sleep(0.2)  # the server has noticed the cancellation; the upload must survive it
    again = query(mchannel, name)
    assert (again.committed_size, again.complete) == (committed, False)
    tail = data[committed:]
    requests = write_requests(name, tail, chunk=16 * 1024, start=committed)
    assert bs(mchannel).Write(requests, timeout=60).committed_size == len(data)
    assert bs_read(mchannel, read_name(sha(data))) == data
    status = query(mchannel, name)
    assert (status.committed_size, status.complete) == (len(data), True)


def test_resume_from_an_earlier_offset(mchannel) -> None:
    """A client may resend bytes the server already has (resume from 0): they are skipped, not doubled."""
    data = rand(MiB + 7)
    name = write_name(sha(data))
    break_stream(mchannel, name, data, 512 * 1024)
    assert bs(mchannel).Write(write_requests(name, data, chunk=100_000), timeout=60).committed_size == len(data)
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_resume_past_committed_is_rejected(mchannel) -> None:
    """Resuming beyond committed_size would leave a hole: INVALID_ARGUMENT."""
    data = rand(MiB)
    name = write_name(sha(data))
    committed = break_stream(mchannel, name, data, 256 * 1024)
    requests = write_requests(name, data[committed + 1000:], start=committed + 1000)
    assert code(lambda: bs(mchannel).Write(requests, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
    assert missing(mchannel, [sha(data)]) == {key(sha(data))}


def test_stream_closed_without_finish_write(mchannel) -> None:
    """A stream that ends without finish_write is an error, but the upload can still be resumed."""
    data = rand(300_000)
    name = write_name(sha(data))
    first = write_requests(name, data[:100_000], finish=False)
    assert code(lambda: bs(mchannel).Write(first, timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
    status = query(mchannel, name)
    assert (status.committed_size, status.complete) == (100_000, False)
    rest = write_requests(name, data[100_000:], start=100_000)
    assert bs(mchannel).Write(rest, timeout=30).committed_size == len(data)
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_resume_takes_over_from_a_stream_still_open(mchannel) -> None:
    """A client that resumes before the server noticed its old stream broke: the new stream owns the upload.

    The old stream, when it wakes up and sends stale data, must fail alone: it must
    not cancel, park or corrupt the upload the new stream is finishing.
    """
    data = rand(MiB)
    name = write_name(sha(data))
    sent = 256 * 1024
    stale = bs_pb2.WriteRequest(write_offset=sent * 3, data=data[sent * 3:sent * 3 + 1000])  # past committed
    old_call, old_release = start_partial_upload(mchannel, name, data, sent, then=[stale])
    committed = wait_committed(mchannel, name, sent).committed_size
    new_requests = list(write_requests(name, data[committed:], start=committed))
    new_call, new_release = start_stream(mchannel, new_requests[:4], then=new_requests[4:])
    wait_committed(mchannel, name, committed + 4 * 16 * 1024)
    old_release.set()
    with pytest.raises(grpc.RpcError):
        old_call.result()
    new_release.set()
    assert new_call.result().committed_size == len(data)
    assert bs_read(mchannel, read_name(sha(data))) == data


def test_concurrent_writers_same_blob(mchannel) -> None:
    """12 clients uploading the same 8 MiB blob at once (a build fan-out) all succeed; the blob is intact."""
    data = rand(8 * MiB)
    digest = sha(data)

    def write(_: int) -> int:
        return bs_write(mchannel, write_name(digest), data, chunk=256 * 1024).committed_size

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(write, range(12)))
    assert results == [len(data)] * 12
    assert hashlib.sha256(bs_read(mchannel, read_name(digest))).hexdigest() == digest.hash


def test_many_small_concurrent_writers(mchannel) -> None:
    """Writers racing on small blobs: whoever loses the race gets an early return, never an error.

    A writer whose upload starts just as another one stores the blob sees storage end
    its write without reading the data; that is an early return (REAPI), not
    INVALID_ARGUMENT (which Bazel treats as fatal).  The race window is small, so this
    runs many rounds.
    """
    errors: list[str] = []

    def write(args: tuple[bytes, int]) -> None:
        data, _ = args
        try:
            assert bs_write(mchannel, write_name(sha(data)), data, chunk=4096).committed_size == len(data)
        except grpc.RpcError as exc:
            errors.append(f"{exc.code()}: {exc.details()}")

    with ThreadPoolExecutor(16) as pool:
        for _ in range(25):
            data = rand(40_000)
            list(pool.map(write, [(data, i) for i in range(16)]))
    assert errors == []
