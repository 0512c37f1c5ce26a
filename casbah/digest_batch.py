"""A batch of digests held as arrays: FindMissingBlobs without a Python object per digest.

A FindMissingBlobs request of a thousand digests cost ~0.9 µs of server CPU per digest
before storage saw it: protobuf built a message wrapper per element, then casbah a
`Digest` tuple, then the presence table turned the tuples back into numbers.  That was
the largest part of the call (docs/storage-engine.md, "FindMissingBlobs at any size").
`DigestArray` is a `Sequence[Digest]` over the request's own bytes: the hex hashes as
a matrix view, sizes as an integer array, and the first 16 bytes of every hash decoded
(what the presence table fingerprints).  Code that iterates it gets ordinary `Digest`
tuples, built on demand; code that knows it (the engine, the response encoder,
`SplicedStorage`) works on the arrays.  `select` keeps positions into the request, so
the response can be cut from the request's bytes (server/wire.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np

from casbah.digest import Digest, DigestFunction


class DigestArray(Sequence[Digest]):
    """Validated digests of one function: hex hashes (a uint8 matrix, `width` columns of
    lowercase hex), sizes (uint64, each < 2^63), and `prefix`, the first 16 bytes of each
    binary hash as two little-endian uint64 words.  `positions` are the digests' indices
    in the request they came from."""

    __slots__ = ("_items", "function", "hexes", "positions", "prefix", "sizes")

    def __init__(self, function: DigestFunction, hexes: np.ndarray, sizes: np.ndarray, prefix: np.ndarray,
                 positions: np.ndarray) -> None:
        self.function = function
        self.hexes = hexes
        self.sizes = sizes
        self.prefix = prefix
        self.positions = positions
        self._items: list[Digest] | None = None

    @classmethod
    def of(cls, digests: Sequence[Digest], function: DigestFunction) -> DigestArray:
        """The array of `digests` (validated ones, all of `function`): what the server
        builds from a request's bytes, built from tuples (tests, tools)."""
        n = len(digests)
        width = function.hex_length
        hexes = np.frombuffer("".join(d.hash for d in digests).encode(), dtype=np.uint8).reshape(n, width)
        prefix = np.frombuffer(b"".join(bytes.fromhex(d.hash[:32]) for d in digests), dtype="<u8").reshape(n, 2)
        sizes = np.array([d.size for d in digests], dtype=np.uint64)
        return cls(function, hexes, sizes, prefix, np.arange(n))

    def __len__(self) -> int:
        return len(self.sizes)

    @overload
    def __getitem__(self, index: int) -> Digest: ...
    @overload
    def __getitem__(self, index: slice) -> list[Digest]: ...
    def __getitem__(self, index: Any) -> Any:
        if self._items is not None or isinstance(index, slice):
            return self.items()[index]
        return Digest(self.hexes[index].tobytes().decode(), int(self.sizes[index]), self.function)

    def __iter__(self) -> Iterator[Digest]:
        return iter(self.items())

    def items(self) -> list[Digest]:
        """Every digest as a `Digest` (built once, then kept)."""
        if self._items is None:
            n, width = self.hexes.shape
            text = self.hexes.tobytes().decode()
            function = self.function
            self._items = [Digest(text[i:i + width], size, function)
                           for i, size in zip(range(0, n * width, width), self.sizes.tolist(), strict=True)]
        return self._items

    def select(self, mask: np.ndarray) -> DigestArray:
        """The digests where `mask` is true, in order."""
        return DigestArray(self.function, self.hexes[mask], self.sizes[mask], self.prefix[mask],
                           self.positions[mask])


def larger_than(digests: Sequence[Digest], size: int) -> Sequence[Digest]:
    """The digests of blobs over `size` bytes (on the arrays, for a `DigestArray`)."""
    if isinstance(digests, DigestArray):
        return digests.select(digests.sizes > np.uint64(size))
    return [d for d in digests if d.size > size]


def without(digests: Sequence[Digest], drop: set[Digest]) -> Sequence[Digest]:
    """`digests` less those in `drop`, in order (a `DigestArray` stays one)."""
    if not drop:
        return digests
    if isinstance(digests, DigestArray):
        return digests.select(np.fromiter((d not in drop for d in digests), dtype=bool, count=len(digests)))
    return [d for d in digests if d not in drop]
