"""Digests: the names of blobs.

A REAPI `Digest` message carries only a hash and a size; which function made the
hash is context (the request's `digest_function`, or the hash length).  casbah's
own `Digest` carries the function too, because storage must know how to verify a
write and must never confuse a SHA-256 blob with a BLAKE3 blob of the same hex.
"""

from __future__ import annotations

import hashlib
from enum import StrEnum
from typing import NamedTuple, Protocol

import blake3 as _blake3

from casbah.errors import InvalidArgument, echo


class DigestFunction(StrEnum):
    """The digest functions casbah serves; values are REAPI's lowercase names."""

    SHA256 = "sha256"
    BLAKE3 = "blake3"

    @property
    def proto_value(self) -> int:
        return _PROTO_VALUES[self]

    @classmethod
    def from_proto(cls, value: int, hash_hex: str | None = None) -> DigestFunction:
        """Map a request's `digest_function` (0 = unset) to a function.

        When unset, REAPI says to infer the function from the hash length; both
        SHA-256 and BLAKE3 are 64 hex characters, so an unset field means SHA-256,
        the function every client assumes by default.
        """
        if value == 0:
            if hash_hex is not None and len(hash_hex) != 64:
                raise InvalidArgument(f"hash {echo(hash_hex)} has {len(hash_hex)} characters: not a SHA-256 hash")
            return cls.SHA256
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise InvalidArgument(
                f"digest_function {value} is not served (served: sha256, blake3)"
            ) from None

    def hasher(self) -> Hasher:
        if self is DigestFunction.SHA256:
            return hashlib.sha256()
        return _blake3.blake3(max_threads=_blake3.blake3.AUTO)


# Values of build.bazel.remote.execution.v2.DigestFunction.Value.
_PROTO_VALUES = {DigestFunction.SHA256: 1, DigestFunction.BLAKE3: 9}
_FROM_PROTO = {v: k for k, v in _PROTO_VALUES.items()}
_HEX = frozenset("0123456789abcdef")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


class Digest(NamedTuple):
    """A blob's name.  A NamedTuple because FindMissingBlobs builds hundreds of
    thousands a second and tuples are the cheapest hashable record in CPython."""

    hash: str
    size: int
    function: DigestFunction = DigestFunction.SHA256

    @property
    def key(self) -> str:
        """The storage key: unique across functions, safe as a file name."""
        if self.function is DigestFunction.SHA256:
            return f"{self.hash}-{self.size}"
        return f"{self.function.value}-{self.hash}-{self.size}"

    def __str__(self) -> str:
        return f"{self.hash}/{self.size}"

    @classmethod
    def parse(cls, text: str, function: DigestFunction = DigestFunction.SHA256) -> Digest:
        """Parse `HASH/SIZE` (the CLI and log form) with validation."""
        hash_hex, sep, size = text.partition("/")
        if not sep:
            raise InvalidArgument(f"digest {echo(text)} is not of the form HASH/SIZE")
        return make_digest(hash_hex, _parse_size(size, text), function)

    @classmethod
    def of(cls, data: bytes, function: DigestFunction = DigestFunction.SHA256) -> Digest:
        h = function.hasher()
        h.update(data)
        return cls(h.hexdigest(), len(data), function)

    def to_proto(self, message_cls: type | None = None):
        if message_cls is None:
            from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2

            message_cls = remote_execution_pb2.Digest
        return message_cls(hash=self.hash, size_bytes=self.size)

    @property
    def is_empty(self) -> bool:
        return self.size == 0


def _parse_size(size: str, text: str) -> int:
    if not (size.isascii() and size.isdigit()):  # str.isdigit() also accepts '²', which int() refuses
        raise InvalidArgument(f"digest {echo(text)} has an invalid size {echo(size)}")
    return int(size)


def make_digest(hash_hex: str, size: int, function: DigestFunction = DigestFunction.SHA256) -> Digest:
    """Validate and build a digest from client input.

    Validation happens here, once, at the edge: storage trusts a `Digest` to have
    a well-formed lowercase hash and a non-negative size (it becomes a file name).
    """
    if len(hash_hex) != 64 or not _HEX.issuperset(hash_hex):
        raise InvalidArgument(f"invalid {function.value} hash {echo(hash_hex)}: want 64 lowercase hex characters")
    if size < 0:
        raise InvalidArgument(f"invalid size {size} for digest {hash_hex}")
    return Digest(hash_hex, size, function)


def from_proto(message, function: DigestFunction) -> Digest:
    return make_digest(message.hash, message.size_bytes, function)


def empty_digest(function: DigestFunction = DigestFunction.SHA256) -> Digest:
    return _EMPTY[function]


_EMPTY = {f: Digest.of(b"", f) for f in DigestFunction}
EMPTY_HASHES = frozenset(d.hash for d in _EMPTY.values())


def is_empty_blob(digest: Digest) -> bool:
    """The empty blob exists everywhere, uploaded or not (REAPI)."""
    return digest.size == 0 and digest.hash == _EMPTY[digest.function].hash
