"""A 2 GiB blob goes through a real server without the server's memory growing.

Storage streams (1 MiB thread hops on disk, bounded upload queues in ByteStream),
so a blob far larger than what the server should ever hold must pass with a
flat RSS.  The client generates the data on the fly (a random 1 MiB block
stamped with a counter) and hashes it on the fly, so it holds no more than the
server should; BLAKE3 keeps hashing (client and server) off the critical path.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator

import blake3
import grpc
import psutil
import pytest

from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

MiB = 1 << 20
SIZE = 2 << 30
LIMIT = 100 * MiB
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def generated(size: int, block: bytes) -> Iterator[bytes]:
    for index, pos in enumerate(range(0, size, MiB)):
        chunk = index.to_bytes(8, "little") + block[8:]
        yield chunk[: min(MiB, size - pos)]


def blake3_of(size: int, block: bytes) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for chunk in generated(size, block):
        h.update(chunk)
    return h.hexdigest()


class RssSampler:
    """Peak RSS of a process, sampled every few milliseconds in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> RssSampler:
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def upload(stub: bs_grpc.ByteStreamStub, hash_hex: str, size: int, block: bytes) -> int:
    name = f"uploads/{uuid.uuid4()}/blobs/blake3/{hash_hex}/{size}"

    def requests() -> Iterator[bs_pb2.WriteRequest]:
        offset = 0
        for chunk in generated(size, block):
            offset += len(chunk)
            yield bs_pb2.WriteRequest(
                resource_name=name if offset == len(chunk) else "", write_offset=offset - len(chunk),
                data=chunk, finish_write=offset == size,
            )

    return stub.Write(requests()).committed_size


def download(stub: bs_grpc.ByteStreamStub, hash_hex: str, size: int) -> tuple[str, int, int]:
    """(blake3 of what was read, bytes read, largest message)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    received = largest = 0
    for response in stub.Read(bs_pb2.ReadRequest(resource_name=f"blobs/blake3/{hash_hex}/{size}")):
        h.update(response.data)
        received += len(response.data)
        largest = max(largest, len(response.data))
    return h.hexdigest(), received, largest


@pytest.mark.slow
def test_2gib_roundtrip_keeps_server_rss_flat(start_server) -> None:
    server = start_server()
    block = os.urandom(MiB)
    with grpc.insecure_channel(server.address, options=OPTIONS) as channel:
        stub = bs_grpc.ByteStreamStub(channel)
        # Warm up (thread pool, gRPC buffers, imports) so growth measures the transfer.
        warm_block = os.urandom(MiB)
        warm_hash = blake3_of(64 * MiB, warm_block)
        assert upload(stub, warm_hash, 64 * MiB, warm_block) == 64 * MiB
        assert download(stub, warm_hash, 64 * MiB)[0] == warm_hash

        hash_hex = blake3_of(SIZE, block)
        baseline = psutil.Process(server.pid).memory_info().rss
        started = time.monotonic()
        with RssSampler(server.pid) as up:
            assert upload(stub, hash_hex, SIZE, block) == SIZE
        uploaded = time.monotonic()
        with RssSampler(server.pid) as down:
            got_hash, received, largest = download(stub, hash_hex, SIZE)
        finished = time.monotonic()

    assert received == SIZE and got_hash == hash_hex
    assert largest <= MiB
    print(
        f"\n2 GiB up {SIZE / (uploaded - started) / 1e6:.0f} MB/s, down {SIZE / (finished - uploaded) / 1e6:.0f} MB/s;"
        f" server RSS baseline {baseline / MiB:.0f} MiB, peak growth up {(up.peak - baseline) / MiB:.0f} MiB,"
        f" down {(down.peak - baseline) / MiB:.0f} MiB"
    )
    assert up.peak - baseline < LIMIT, f"upload grew the server's RSS by {(up.peak - baseline) / MiB:.0f} MiB"
    assert down.peak - baseline < LIMIT, f"download grew the server's RSS by {(down.peak - baseline) / MiB:.0f} MiB"
