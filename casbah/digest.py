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
from casbah.sha256tree import Sha256TreeHasher


class DigestFunction(StrEnum):
    """The digest functions casbah can serve; values are REAPI's lowercase names.

    Which of them an instance serves is its `digest-functions` config (see
    `DEFAULT_FUNCTIONS`); this enum is what the code knows how to compute.
    """

    SHA256 = "sha256"
    SHA1 = "sha1"
    MD5 = "md5"
    SHA384 = "sha384"
    SHA512 = "sha512"
    SHA256TREE = "sha256tree"
    BLAKE3 = "blake3"
    GITSHA1 = "gitsha1"

    @property
    def proto_value(self) -> int:
        return _PROTO_VALUES[self]

    @property
    def hex_length(self) -> int:
        """Characters of a hash in lowercase hex."""
        return _HEX_LENGTHS[self]

    @property
    def resource_segment(self) -> str:
        """The `{digest_function}/` part of a ByteStream resource name: REAPI names only
        the functions a hash length cannot identify (BLAKE3, SHA256TREE, GITSHA1)."""
        return "" if self in _INFERABLE else f"{self.value}/"

    @classmethod
    def from_proto(cls, value: int, hash_hex: str | None = None) -> DigestFunction:
        """The function a request's `digest_function` names; when unset (0), the one
        `hash_hex`'s length implies (`infer`)."""
        if value == 0:
            return cls.infer(hash_hex)
        try:
            return _FROM_PROTO[value]
        except KeyError:
            raise InvalidArgument(f"digest_function {_proto_name(value)} is not supported by casbah "
                                  f"(supported: {', '.join(f.value for f in cls)})") from None

    @classmethod
    def infer(cls, hash_hex: str | None) -> DigestFunction:
        """The function an old client means when it leaves `digest_function` unset.

        REAPI lets a client omit it only for functions its hash length identifies
        (SHA256, SHA1, MD5, SHA384, SHA512, and VSO and MURMUR3 which casbah does
        not compute); a 64-hex hash is therefore SHA-256, never BLAKE3 or
        SHA256TREE, and a 40-hex one SHA-1, never GITSHA1.  No hash at all (a
        request without digests) means SHA-256, every client's default.
        """
        if hash_hex is None:
            return cls.SHA256
        try:
            return _BY_LENGTH[len(hash_hex)]
        except KeyError:
            raise InvalidArgument(
                f"hash {hash_hex[:140]!r} has {len(hash_hex)} characters, which is no digest function's length "
                "(set digest_function for functions that must be named)"
            ) from None

    def hasher(self, size: int | None = None) -> Hasher:
        """A fresh incremental hasher.  GITSHA1 hashes a header holding the blob's
        size before its content, so it needs `size` up front."""
        if self is DigestFunction.SHA256:
            return hashlib.sha256()
        if self is DigestFunction.BLAKE3:
            return _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        if self is DigestFunction.SHA256TREE:
            return Sha256TreeHasher()
        if self is DigestFunction.GITSHA1:
            if size is None:
                raise ValueError("a gitsha1 hasher needs the blob size up front")
            h = hashlib.sha1(usedforsecurity=False)
            h.update(b"blob %d\0" % size)
            return h
        return hashlib.new(self.value, usedforsecurity=self not in _LEGACY)


# Values of build.bazel.remote.execution.v2.DigestFunction.Value.
_PROTO_VALUES = {
    DigestFunction.SHA256: 1, DigestFunction.SHA1: 2, DigestFunction.MD5: 3, DigestFunction.SHA384: 5,
    DigestFunction.SHA512: 6, DigestFunction.SHA256TREE: 8, DigestFunction.BLAKE3: 9, DigestFunction.GITSHA1: 10,
}
_FROM_PROTO = {v: k for k, v in _PROTO_VALUES.items()}
_PROTO_NAMES = {0: "UNKNOWN", 4: "VSO", 7: "MURMUR3"}
_HEX_LENGTHS = {
    DigestFunction.SHA256: 64, DigestFunction.SHA1: 40, DigestFunction.MD5: 32, DigestFunction.SHA384: 96,
    DigestFunction.SHA512: 128, DigestFunction.SHA256TREE: 64, DigestFunction.BLAKE3: 64, DigestFunction.GITSHA1: 40,
}
#: Functions a client may leave unnamed (request field unset, no resource-name segment).
_INFERABLE = frozenset({DigestFunction.SHA256, DigestFunction.SHA1, DigestFunction.MD5, DigestFunction.SHA384,
                        DigestFunction.SHA512})
_BY_LENGTH = {f.hex_length: f for f in _INFERABLE}
#: Hash lengths an unset `digest_function` can be inferred from.
INFERABLE_LENGTHS = frozenset(_BY_LENGTH)
#: Broken as cryptographic hashes: served only to legacy clients, off unless an instance enables them.
_LEGACY = frozenset({DigestFunction.SHA1, DigestFunction.MD5})
#: What an instance serves when its config does not say.
DEFAULT_FUNCTIONS: tuple[DigestFunction, ...] = tuple(f for f in DigestFunction if f not in _LEGACY)
_HEX = frozenset("0123456789abcdef")


def _proto_name(value: int) -> str:
    return f"{value} ({_PROTO_NAMES[value]})" if value in _PROTO_NAMES else str(value)


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...
    def digest(self) -> bytes: ...


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
        h = function.hasher(len(data))
        h.update(data)
        return cls(h.hexdigest(), len(data), function)

    def to_proto(self, message_cls: type | None = None):
        if message_cls is None:
            from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2

            message_cls = remote_execution_pb2.Digest
        return message_cls(hash=self.hash, size_bytes=self.size)


def _parse_size(size: str, text: str) -> int:
    if not (size.isascii() and size.isdigit()):  # str.isdigit() also accepts '²', which int() refuses
        raise InvalidArgument(f"digest {echo(text)} has an invalid size {echo(size)}")
    return int(size)


def make_digest(hash_hex: str, size: int, function: DigestFunction = DigestFunction.SHA256) -> Digest:
    """Validate and build a digest from client input.

    Validation happens here, once, at the edge: storage trusts a `Digest` to have
    a well-formed lowercase hash and a non-negative size (it becomes a file name).
    """
    if len(hash_hex) != function.hex_length or not _HEX.issuperset(hash_hex):
        raise InvalidArgument(f"invalid {function.value} hash {echo(hash_hex)}: "
                              f"want {function.hex_length} lowercase hex characters")
    if size < 0:
        raise InvalidArgument(f"invalid size {size} for digest {hash_hex}")
    return Digest(hash_hex, size, function)


def from_proto(message, function: DigestFunction) -> Digest:
    return make_digest(message.hash, message.size_bytes, function)


_EMPTY = {f: Digest.of(b"", f) for f in DigestFunction}
EMPTY_HASHES = frozenset(d.hash for d in _EMPTY.values())


def is_empty_blob(digest: Digest) -> bool:
    """The empty blob exists everywhere, uploaded or not (REAPI)."""
    return digest.size == 0 and digest.hash == _EMPTY[digest.function].hash
