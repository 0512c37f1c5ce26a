"""The digest functions themselves: published vectors, git's blob ids, streaming, names."""

from __future__ import annotations

import hashlib
import itertools
import os
import subprocess
from pathlib import Path

import pytest

from casbah import sha256tree
from casbah.digest import DEFAULT_FUNCTIONS, Digest, DigestFunction, make_digest
from casbah.errors import InvalidArgument
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2

VECTORS = Path(__file__).parent / "data" / "sha256tree_test_vectors.txt"
_PATTERN = bytes(range(251))


def vector_input(size: int) -> bytes:
    """The vectors' input: bytes 0..250, repeating."""
    return (_PATTERN * (size // 251 + 1))[:size]


def vectors() -> list[tuple[int, str]]:
    rows = [line.split() for line in VECTORS.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return [(int(size), digest) for size, digest in rows]


def test_vector_file_is_the_published_one() -> None:
    assert len(vectors()) == 18 and vectors()[0] == (1025, vectors()[0][1]) and vectors()[-1][0] == 102400


@pytest.mark.parametrize(("size", "expected"), vectors(), ids=lambda v: str(v)[:8])
def test_sha256tree_vectors_whole_and_streamed(size: int, expected: str) -> None:
    data = vector_input(size)
    assert Digest.of(data, DigestFunction.SHA256TREE).hash == expected
    hasher = DigestFunction.SHA256TREE.hasher()
    pieces = itertools.cycle([1, 1023, 1, 1024, 1025, 7, 0])  # leaf boundaries met from every side
    pos = 0
    while pos < size:
        step = next(pieces)
        hasher.update(data[pos:pos + step])
        pos += step
    assert hasher.hexdigest() == expected
    assert hasher.hexdigest() == expected  # digest() does not consume the state


def test_sha256tree_is_sha256_up_to_one_leaf() -> None:
    for size in (0, 1, 63, 64, 1000, 1024):
        data = os.urandom(size)
        assert Digest.of(data, DigestFunction.SHA256TREE).hash == hashlib.sha256(data).hexdigest()
    assert Digest.of(os.urandom(1025), DigestFunction.SHA256TREE).hash != hashlib.sha256(b"").hexdigest()


def test_sha256tree_parent_compression_paths_agree() -> None:
    """The fast path (libcrypto's block function, feed-forward undone) equals the
    pure-Python block cipher on arbitrary blocks; the vectors above pin both to the spec."""
    for _ in range(50):
        block = os.urandom(64)
        assert sha256tree.compress(block) == sha256tree.compress_python(block)


def test_sha256tree_memory_is_one_leaf_and_one_hash_per_level() -> None:
    """Streaming 64 MiB keeps at most one leaf of input and log2(leaves) subtree hashes."""
    hasher = sha256tree.Sha256TreeHasher()
    piece = os.urandom(1 << 20)
    deepest = 0
    for _ in range(64):
        hasher.update(piece)
        deepest = max(deepest, len(hasher._stack))
        assert len(hasher._leaf) <= sha256tree.LEAF
    assert deepest <= 17  # 64 Ki leaves: at most one pending subtree per level


def test_gitsha1_is_git_hash_object(tmp_path: Path) -> None:
    for size in (0, 5, 70_000):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        git = subprocess.run(["git", "hash-object", "--no-filters", str(path)], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert Digest.of(data, DigestFunction.GITSHA1).hash == git


def test_gitsha1_hasher_needs_the_size() -> None:
    with pytest.raises(ValueError, match="size"):
        DigestFunction.GITSHA1.hasher()


@pytest.mark.parametrize("function", list(DigestFunction), ids=str)
def test_each_function_matches_its_reference(function: DigestFunction) -> None:
    data = os.urandom(3000)
    reference = {
        DigestFunction.SHA256: hashlib.sha256, DigestFunction.SHA1: hashlib.sha1, DigestFunction.MD5: hashlib.md5,
        DigestFunction.SHA384: hashlib.sha384, DigestFunction.SHA512: hashlib.sha512,
    }.get(function)
    digest = Digest.of(data, function)
    assert len(digest.hash) == function.hex_length
    if reference is not None:
        assert digest.hash == reference(data).hexdigest()
    assert function.proto_value == re_pb2.DigestFunction.Value.Value(function.name)
    assert DigestFunction.from_proto(function.proto_value) is function
    make_digest(digest.hash, digest.size, function)  # its own length validates
    other = next(f for f in DigestFunction if f.hex_length != function.hex_length)
    with pytest.raises(InvalidArgument, match=other.value):
        make_digest(digest.hash, digest.size, other)


def test_resource_segments_only_for_functions_a_length_cannot_name() -> None:
    named = {f for f in DigestFunction if f.resource_segment}
    assert named == {DigestFunction.BLAKE3, DigestFunction.SHA256TREE, DigestFunction.GITSHA1}
    assert DigestFunction.GITSHA1.resource_segment == "gitsha1/"


def test_unset_function_is_inferred_from_length_as_reapi_says() -> None:
    assert DigestFunction.from_proto(0, "a" * 64) is DigestFunction.SHA256  # never blake3 or sha256tree
    assert DigestFunction.from_proto(0, "a" * 40) is DigestFunction.SHA1  # never gitsha1: it must be named
    assert DigestFunction.from_proto(0, "a" * 32) is DigestFunction.MD5
    assert DigestFunction.from_proto(0, "a" * 96) is DigestFunction.SHA384
    assert DigestFunction.from_proto(0, "a" * 128) is DigestFunction.SHA512
    assert DigestFunction.from_proto(0, None) is DigestFunction.SHA256
    with pytest.raises(InvalidArgument, match="50 characters"):
        DigestFunction.from_proto(0, "a" * 50)
    for value in (4, 7, 11, -1):  # VSO, MURMUR3, unknown
        with pytest.raises(InvalidArgument, match="not supported"):
            DigestFunction.from_proto(value)


def test_legacy_functions_are_off_by_default() -> None:
    assert DigestFunction.SHA1 not in DEFAULT_FUNCTIONS and DigestFunction.MD5 not in DEFAULT_FUNCTIONS
    assert set(DEFAULT_FUNCTIONS) == set(DigestFunction) - {DigestFunction.SHA1, DigestFunction.MD5}
