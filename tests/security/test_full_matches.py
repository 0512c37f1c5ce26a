"""Parsers of client (and operator) input accept a value only when all of it is well formed.

A `re.match` with `$`, or `str.isdigit()`, accepts more than it seems to: `$` also
matches before a final newline, and `isdigit()` is true for '²', which `int()` then
refuses with a ValueError that would surface as INTERNAL.  Origin-fetch specifics
(vcs.commit, redirects) are in tests/server/test_origin_security.py.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from casbah.assets.origin import parse_sri
from casbah.config import parse_size
from casbah.digest import Digest
from casbah.errors import InvalidArgument
from casbah.server.auth import load_tokens

HASH = "a" * 64


@pytest.mark.parametrize("text", [f"{HASH}/²", f"{HASH}/1\n", f"{HASH}/-1", f"{HASH}\n/1"])
def test_digest_parse_refuses_anything_but_ascii_digits(text: str) -> None:
    with pytest.raises(InvalidArgument):
        Digest.parse(text)
    assert Digest.parse(f"{HASH}/12").size == 12


def test_sri_hash_of_the_wrong_length_is_invalid() -> None:
    short = base64.b64encode(hashlib.sha256(b"x").digest()[:31]).decode()
    with pytest.raises(InvalidArgument, match="32 bytes, not 31"):
        parse_sri(f"sha256-{short}")
    good = base64.b64encode(hashlib.sha512(b"x").digest()).decode()
    assert parse_sri(f"sha512-{good}") == ("sha512", hashlib.sha512(b"x").digest())
    with pytest.raises(InvalidArgument, match="invalid base64"):
        parse_sri(f"sha512-{good}\x00")


def test_tokens_file_wants_hex(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"sha256:{'g' * 64} read\n")
    with pytest.raises(InvalidArgument, match="sha256:<64 hex>"):
        load_tokens(str(path))
    path.write_text(f"sha256:{hashlib.sha256(b't').hexdigest().upper()} read\n")
    assert list(load_tokens(str(path))) == [hashlib.sha256(b"t").hexdigest()]


@pytest.mark.parametrize("text", ["1G\nx", "²G", "1G;rm"])
def test_sizes_are_full_matches(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)
