"""Things both sides of the benchmark need: protos, channels, digests, test data.

Everything here must be importable in a freshly spawned load-generator process, so it
imports nothing heavier than grpc and the generated protos.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import grpc
import grpc.experimental

from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2_grpc as re_grpc
from casbah.protos.google.bytestream import bytestream_pb2 as bs_pb2
from casbah.protos.google.bytestream import bytestream_pb2_grpc as bs_grpc

__all__ = [
    "EMPTY_SHA256",
    "BenchError",
    "Dataset",
    "VerificationError",
    "batches_by_size",
    "bs_grpc",
    "bs_pb2",
    "make_channel",
    "re_grpc",
    "re_pb2",
    "read_resource",
    "write_resource",
]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# gRPC's default 4 MiB receive limit would make a server that answers ByteStream.Read
# with bigger chunks look broken; the benchmark is not the place to enforce it.
MAX_MESSAGE = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # An inherited http_proxy must never divert loopback benchmark traffic.
    ("grpc.enable_http_proxy", 0),
    # Each client process gets its own connection, as separate Bazel/BuildStream clients would.
    ("grpc.use_local_subchannel_pool", 1),
    # Server-streaming calls (ByteStream.Read, GetTree) without a helper thread per call:
    # measured here, it cuts the client's CPU per small-blob Read from ~0.7 ms to ~0.25 ms,
    # which on 2 shared cores goes back to the server under test.
    (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
]


class BenchError(Exception):
    """A scenario could not run (server error, unsupported call, timeout)."""


class VerificationError(BenchError):
    """The server answered, but wrongly: data, digests or missing sets do not match."""


def make_channel(address: str) -> grpc.Channel:
    """An insecure channel to `address` (`host:port`) with the benchmark's options."""
    return grpc.insecure_channel(address, options=CHANNEL_OPTIONS)


def read_resource(instance: str, digest: re_pb2.Digest) -> str:
    """`{instance}/blobs/{hash}/{size}`; an empty instance has no leading slash."""
    name = f"blobs/{digest.hash}/{digest.size_bytes}"
    return f"{instance}/{name}" if instance else name


def write_resource(instance: str, upload_id: str, digest: re_pb2.Digest) -> str:
    """`{instance}/uploads/{uuid}/blobs/{hash}/{size}`; an empty instance has no leading slash."""
    name = f"uploads/{upload_id}/blobs/{digest.hash}/{digest.size_bytes}"
    return f"{instance}/{name}" if instance else name


# --------------------------------------------------------------------------- test data

# Blobs are cut from one pseudo-random pool and made unique by a 16-byte header, so any
# process can rebuild any blob from (seed, index) without shipping data between processes,
# and making 20k fresh blobs costs a slice and a hash instead of 90 MB of random numbers.
_POOL_SIZE = 8 * 1024 * 1024
_HEADER = struct.Struct("<QQ")


@lru_cache(maxsize=1)
def _pool() -> bytes:
    return random.Random(0x5EED).randbytes(_POOL_SIZE)


@dataclass(frozen=True)
class Dataset:
    """A reproducible set of `count` random blobs of `min_size`..`max_size` bytes.

    Identified by `seed`: two datasets with different seeds share no blob, so a
    fresh seed per repeat guarantees uploads the server has never seen.
    """

    seed: int
    count: int
    min_size: int
    max_size: int

    def __post_init__(self) -> None:
        if self.min_size < _HEADER.size or self.max_size < self.min_size:
            raise ValueError(f"blob sizes {self.min_size}..{self.max_size} invalid (min {_HEADER.size})")
        if self.max_size > _POOL_SIZE:
            raise ValueError("blobs larger than the pool are not supported")

    def _layout(self) -> list[tuple[int, int]]:
        return _layout(self.seed, self.count, self.min_size, self.max_size)

    def blob(self, index: int) -> bytes:
        size, offset = self._layout()[index]
        return _HEADER.pack(self.seed, index) + _pool()[offset : offset + size - _HEADER.size]

    def blobs(self, indices: Iterable[int]) -> Iterator[tuple[re_pb2.Digest, bytes]]:
        """(digest, data) for each index; hashing here is what the verifier trusts."""
        for i in indices:
            data = self.blob(i)
            yield re_pb2.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data)), data

    def total_bytes(self) -> int:
        return sum(size for size, _ in self._layout())


@lru_cache(maxsize=8)
def _layout(seed: int, count: int, min_size: int, max_size: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    layout = []
    for _ in range(count):
        size = rng.randint(min_size, max_size)
        layout.append((size, rng.randrange(0, _POOL_SIZE - size + 1)))
    return layout


def missing_digests(seed: int, count: int) -> list[re_pb2.Digest]:
    """Digests of blobs nobody has: random hashes (a collision is 2**-256 unlikely)."""
    rng = random.Random(seed)
    return [
        re_pb2.Digest(hash=rng.randbytes(32).hex(), size_bytes=rng.randint(1, 1 << 20)) for _ in range(count)
    ]


def slice_indices(count: int, parts: int, part: int) -> range:
    """The `part`-th of `parts` contiguous, near-equal slices of range(count)."""
    start = count * part // parts
    return range(start, count * (part + 1) // parts)


# Per-blob protobuf overhead in a batch request/response (digest, field tags, status),
# generously rounded up so a batch never exceeds the limit it was cut for.
BATCH_BLOB_OVERHEAD = 128


def batches_by_size(
    items: Iterable[tuple[re_pb2.Digest, bytes]], limit: int
) -> Iterator[list[tuple[re_pb2.Digest, bytes]]]:
    """Group blobs into batches whose payload plus overhead stays within `limit` bytes."""
    batch: list[tuple[re_pb2.Digest, bytes]] = []
    used = 0
    for digest, data in items:
        cost = digest.size_bytes + BATCH_BLOB_OVERHEAD
        if batch and used + cost > limit:
            yield batch
            batch, used = [], 0
        batch.append((digest, data))
        used += cost
    if batch:
        yield batch


def rpc_error(what: str, err: grpc.RpcError) -> BenchError:
    """A BenchError naming the call and the server's status, for loud, precise failures."""
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    return BenchError(f"{what}: {code.name if code else 'error'}: {details}")
