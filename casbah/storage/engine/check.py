"""The stored checksum that reads verify against: XXH3-64 of a blob's bytes, computed at write.

Why not the digest function: a read only has to catch what the disk or an operator
changed since the write, and the write already proved content and digest agree (it
hashed every byte with the digest function before committing).  XXH3-64 runs at
~20+ GB/s where SHA-256 runs at ~1.4 GB/s here, so verifying every read costs ~0.05
ms per MiB instead of ~0.7 (docs/storage-engine.md, "Verification and repair";
docs/security.md, "What is verified where").  An attacker who can write the store can
forge it; such an attacker is outside the threat model, and `casbah admin scrub`
still re-hashes every blob with its digest function.

The checksum is a function of the content alone, so every `order` entry of one blob
carries the same value: a reader that raced a re-upload compares against the right one.
Entries written by older code have none: those are verified by the digest function.
"""

from __future__ import annotations

import hashlib
from typing import NoReturn

import xxhash

from casbah.digest import Digest, DigestFunction
from casbah.errors import DataLoss
from casbah.streams import Verifier

#: Bytes of a stored checksum.
CHECK_BYTES = 8

new_hasher = xxhash.xxh3_64
_digest = xxhash.xxh3_64_digest


def checksum(data: bytes | memoryview) -> bytes:
    """The stored checksum of `data` (8 bytes)."""
    return _digest(data)


def matches(digest: Digest, data: bytes) -> bool:
    """Hot: every inline blob read is hashed (SHA-256 straight from hashlib, the common case)."""
    if len(data) != digest.size:
        return False
    if digest.function is DigestFunction.SHA256:
        return hashlib.sha256(data).hexdigest() == digest.hash
    hasher = digest.function.hasher(digest.size)
    hasher.update(data)
    return hasher.hexdigest() == digest.hash


def intact(data: bytes | memoryview, check: bytes) -> bool:
    """Hot: every inline blob read with a checksum goes through here."""
    return _digest(data) == check


class ChecksumVerifier(Verifier):
    """Verifies a streamed read of a file blob against its stored checksum: same
    interface as the digest function's `ReadVerifier` (`verified_range` holds the last
    chunk back until `finish` passed), a mismatch is DataLoss naming the store.

    `length` is the stored length (an ActionCache entry's digest names the action, not
    the entry, so its size says nothing of the bytes); messages name `shown`."""

    __slots__ = ("check", "shown", "source")

    def __init__(self, digest: Digest, length: int, check: bytes, source: str) -> None:
        self.shown = digest
        self.digest = Digest(digest.hash, length, digest.function)
        self._hasher = new_hasher()  # the same update/digest interface as hashlib
        self.received = 0
        self.check = check
        self.source = source

    def update(self, chunk: bytes | memoryview) -> None:
        self.received += len(chunk)
        if self.received > self.digest.size:
            self._fail(f"has more than its {self.digest.size} stored bytes")
        self._hasher.update(chunk)

    def finish(self) -> None:
        if self.received != self.digest.size:
            self._fail(f"has {self.received} bytes, {self.digest.size} were stored")
        if self._hasher.digest() != self.check:
            self._fail("does not match the checksum stored when it was written")

    def _fail(self, problem: str) -> NoReturn:
        raise DataLoss(f"blob {self.shown} as read from {self.source} {problem}: not served")
