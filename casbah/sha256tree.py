"""SHA256TREE, the REAPI's Merkle-tree variant of SHA-256, as a streaming hasher.

The REAPI defines it recursively: a blob of at most 1 KiB hashes as plain SHA-256;
a longer one is split into a left part of 2^k bytes and a right part of 1..2^k
bytes, both hashed the same way, and the two 32-byte hashes form one 64-byte block
that goes through a single SHA-256 compression with another initial state (the
fractional square roots of the 9th to 16th primes) and without the final addition
of that state.

Read bottom-up, that is a left-complete binary tree over 1 KiB leaves, which can be
hashed in one pass keeping only one leaf of input and one hash per tree level: a
finished leaf is pushed on a stack of complete subtrees, merging equal-sized
neighbours as the leaf count's trailing zero bits say, but only once more input
shows it is not the last leaf (the last leaf closes the right spine instead).  So
memory is O(1 KiB + 32 bytes x log2(size)), whatever the blob size.

Parent nodes use OpenSSL's raw SHA-256 block function (the one hashlib itself is
built on), loaded with the tree's initial state; its Davies-Meyer addition is
undone by subtracting that state again.  Where it cannot be loaded, a pure-Python
compression gives the same answer, slowly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import struct

LEAF = 1024

#: The initial state of a parent compression (REAPI: square roots of the primes 23..53).
PARENT_IV = (0xCBBB9D5D, 0x629A292A, 0x9159015A, 0x152FECD8, 0x67332667, 0x8EB44A87, 0xDB0C2E0D, 0x47B5481D)

_K = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4, 0xAB1C5ED5,
    0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE, 0x9BDC06A7, 0xC19BF174,
    0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F, 0x4A7484AA, 0x5CB0A9DC, 0x76F988DA,
    0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7, 0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967,
    0x27B70A85, 0x2E1B2138, 0x4D2C6DFC, 0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85,
    0xA2BFE8A1, 0xA81A664B, 0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070,
    0x19A4C116, 0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7, 0xC67178F2,
)
_M32 = 0xFFFFFFFF
_WORDS = struct.Struct(">8I")


def _rotr(x: int, n: int) -> int:
    return ((x >> n) | (x << (32 - n))) & _M32


def compress_python(block: bytes) -> bytes:
    """One SHA-256 block cipher call on a 64-byte block from PARENT_IV, no feed-forward."""
    w = list(struct.unpack(">16I", block))
    for i in range(16, 64):
        s0 = _rotr(w[i - 15], 7) ^ _rotr(w[i - 15], 18) ^ (w[i - 15] >> 3)
        s1 = _rotr(w[i - 2], 17) ^ _rotr(w[i - 2], 19) ^ (w[i - 2] >> 10)
        w.append((w[i - 16] + s0 + w[i - 7] + s1) & _M32)
    a, b, c, d, e, f, g, h = PARENT_IV
    for i in range(64):
        t1 = (h + (_rotr(e, 6) ^ _rotr(e, 11) ^ _rotr(e, 25)) + ((e & f) ^ (~e & g)) + _K[i] + w[i]) & _M32
        t2 = ((_rotr(a, 2) ^ _rotr(a, 13) ^ _rotr(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & _M32
        a, b, c, d, e, f, g, h = (t1 + t2) & _M32, a, b, c, (d + t1) & _M32, e, f, g
    return _WORDS.pack(a, b, c, d, e, f, g, h)


#: OpenSSL's SHA256_CTX is 112 bytes; its first 32 are the eight state words (native order).
_CTX_SIZE = 112
_NATIVE_WORDS = struct.Struct("=8I")


def _openssl_compress():
    """A fast `compress` over libcrypto's SHA256_Transform, or None where it is missing."""
    name = ctypes.util.find_library("crypto")
    if not name:
        return None
    try:
        transform = ctypes.CDLL(name).SHA256_Transform
    except (OSError, AttributeError):
        return None
    transform.restype = None
    ctx = bytearray(_CTX_SIZE)
    ctx_ref = (ctypes.c_char * _CTX_SIZE).from_buffer(ctx)
    start = _NATIVE_WORDS.pack(*PARENT_IV)
    unpack, pack, iv = _NATIVE_WORDS.unpack_from, _WORDS.pack, PARENT_IV

    def compress(block: bytes) -> bytes:
        ctx[:32] = start
        transform(ctx_ref, block)
        return pack(*[(word - first) & _M32 for word, first in zip(unpack(ctx), iv, strict=True)])

    probe = bytes(range(64))
    return compress if compress(probe) == compress_python(probe) else None


compress = _openssl_compress() or compress_python


class Sha256TreeHasher:
    """Incremental SHA256TREE with the `update`/`hexdigest` interface of hashlib."""

    __slots__ = ("_count", "_leaf", "_stack")

    name = "sha256tree"

    def __init__(self, data: bytes | memoryview = b"") -> None:
        self._leaf = bytearray()  # the current leaf: up to LEAF bytes, hashed once more input follows
        self._stack: list[bytes] = []  # hashes of complete subtrees, largest first
        self._count = 0  # leaves pushed so far
        if data:
            self.update(data)

    def update(self, data: bytes | memoryview, /) -> None:
        view = memoryview(data).cast("B")
        n = len(view)
        pos = 0
        if self._leaf:
            pos = min(LEAF - len(self._leaf), n)
            self._leaf += view[:pos]
            if pos < n:  # the leaf is full and more follows: it is not the last one
                self._push(hashlib.sha256(self._leaf).digest())
                self._leaf.clear()
        sha256 = hashlib.sha256
        while n - pos > LEAF:
            self._push(sha256(view[pos:pos + LEAF]).digest())
            pos += LEAF
        self._leaf += view[pos:]

    def _push(self, node: bytes) -> None:
        self._count += 1
        count = self._count
        while not count & 1:
            node = compress(self._stack.pop() + node)
            count >>= 1
        self._stack.append(node)

    def digest(self) -> bytes:
        node = hashlib.sha256(self._leaf).digest()
        for left in reversed(self._stack):
            node = compress(left + node)
        return node

    def hexdigest(self) -> str:
        return self.digest().hex()
