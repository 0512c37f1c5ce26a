"""Parsing storage keys (`Digest.key`: `hash-size`, or `function-hash-size`) back into digests.

Used where keys come back from a store that lists them (S3, Redis) and by the import
of the old file-per-blob disk layout, whose file names were these keys.
"""

from __future__ import annotations

from casbah.digest import Digest, DigestFunction

_FUNCTIONS = {f.value: f for f in DigestFunction}
_HEX = frozenset("0123456789abcdef")


def parse_key(name: str) -> Digest | None:
    parts = name.split("-")
    try:
        if len(parts) == 2:
            digest = Digest(parts[0], int(parts[1]), DigestFunction.SHA256)
        elif len(parts) == 3:
            digest = Digest(parts[1], int(parts[2]), _FUNCTIONS[parts[0]])
        else:
            return None
    except (ValueError, KeyError):
        return None
    if (len(digest.hash) != digest.function.hex_length or not _HEX.issuperset(digest.hash) or digest.size < 0
            or digest.key != name):
        return None
    return digest
