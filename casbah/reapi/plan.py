"""Pure planning for REAPI calls: how digests are grouped and packed into requests.

No I/O here, so the rules are unit-tested on their own and the same for every
caller (the `remote` storage backend, the CLI, the local cache).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from casbah.digest import Digest, DigestFunction

T = TypeVar("T")

#: Digests per FindMissingBlobs request: ~80 bytes a digest, so ~800 KB, well under any message limit.
FMB_GROUP = 10_000

#: Used when the remote does not say (no GetCapabilities, or 0): what every server takes.
SAFE_BATCH_SIZE = 2 * 1024 * 1024

#: Room kept in a message for everything that is not blob data (instance name, digest function).
MESSAGE_SLACK = 64 * 1024

#: Protobuf bytes one blob adds to a batch beyond its data, counted against the batch limit.
#:
#: A `BatchUpdateBlobsRequest.Request` / `BatchReadBlobsResponse.Response` entry is: the
#: entry's tag (1 byte) and length (a varint, at most 5 bytes for a blob under 4 GiB); the
#: `digest` field (tag + length, 2 bytes) holding a 64-character hex hash (SHA-256 and BLAKE3
#: alike: tag + length + 64 = 66 bytes) and `size_bytes` (tag + a varint of at most 10
#: bytes); the `data` field's tag and length (at most 6 bytes); `compressor` (2 bytes); and,
#: in a read response, the `status` (empty for OK; an error status carries a message but
#: then no data).  That is at most 1 + 5 + 2 + 66 + 11 + 6 + 2 = 93 bytes; 128 rounds it up
#: with room for a short status.  Counting it keeps the whole message within the limit for
#: servers that apply the limit to the message rather than to the data.
BLOB_OVERHEAD = 128


def batch_limit(advertised: int, max_message: int) -> int:
    """The bytes a batch may carry: what the server advertises (a safe default when it
    does not say), and never more than fits in a message we may send or receive."""
    return min(advertised or SAFE_BATCH_SIZE, max_message - MESSAGE_SLACK)


def fits_batch(digest: Digest, limit: int) -> bool:
    """The small/large cut: a blob goes in a batch when it fits in one alone (its data
    and its entry overhead within `limit`); larger ones go over ByteStream."""
    return digest.size + BLOB_OVERHEAD <= limit


def by_function(items: Iterable[T], digest_of: Callable[[T], Digest]) -> dict[DigestFunction, list[T]]:
    """Items grouped by digest function, in order: a REAPI request names one function,
    and callers may mix them."""
    groups: dict[DigestFunction, list[T]] = {}
    for item in items:
        groups.setdefault(digest_of(item).function, []).append(item)
    return groups


def find_missing_groups(digests: Sequence[Digest], group: int = FMB_GROUP) -> list[list[Digest]]:
    """FindMissingBlobs requests: one digest function each, at most `group` digests."""
    return [
        same[i : i + group]
        for same in by_function(digests, _itself).values()
        for i in range(0, len(same), group)
    ]


def split_by_size(items: Iterable[T], limit: int, digest_of: Callable[[T], Digest]) -> tuple[list[T], list[T]]:
    """(batchable, streamed) by `fits_batch`."""
    small: list[T] = []
    large: list[T] = []
    for item in items:
        (small if fits_batch(digest_of(item), limit) else large).append(item)
    return small, large


def pack_batches(items: Iterable[T], limit: int, digest_of: Callable[[T], Digest]) -> list[list[T]]:
    """Batches of one digest function each whose sizes plus `BLOB_OVERHEAD` a blob fit
    `limit`, in input order within a function.  Items must each fit alone (`fits_batch`)."""
    batches: list[list[T]] = []
    for group in by_function(items, digest_of).values():
        current: list[T] = []
        total = 0
        for item in group:
            cost = digest_of(item).size + BLOB_OVERHEAD
            if current and total + cost > limit:
                batches.append(current)
                current, total = [], 0
            current.append(item)
            total += cost
        if current:
            batches.append(current)
    return batches


def _prefix(instance: str) -> str:
    return f"{instance}/" if instance else ""


def _blob_part(digest: Digest, compressed: bool) -> str:
    kind = "compressed-blobs/zstd" if compressed else "blobs"
    return f"{kind}/{digest.function.resource_segment}{digest.hash}/{digest.size}"


def blob_resource(instance: str, digest: Digest, compressed: bool = False) -> str:
    """The ByteStream read name: `{instance}/blobs/{function/}{hash}/{size}` (the function
    segment only where the hash length cannot name it: BLAKE3, SHA256TREE, GITSHA1;
    `compressed-blobs/zstd` instead of `blobs` when compressed)."""
    return _prefix(instance) + _blob_part(digest, compressed)


def upload_resource(instance: str, upload_id: str, digest: Digest, compressed: bool = False) -> str:
    """The ByteStream write name: `{instance}/uploads/{uuid}/blobs/{function/}{hash}/{size}`."""
    return f"{_prefix(instance)}uploads/{upload_id}/{_blob_part(digest, compressed)}"


def _itself(digest: Digest) -> Digest:
    return digest
