"""ByteStream resource names.

Read:  `{instance}/blobs/{fn/}{hash}/{size}` or `{instance}/compressed-blobs/{compressor}/{fn/}{hash}/{size}`
Write: `{instance}/uploads/{uuid}/blobs/...` or `.../uploads/{uuid}/compressed-blobs/...`, then optional
`/{metadata}`.  The instance may have several segments, so names are parsed by
finding the keyword segment, never by position from the start.

The digest function comes from the `fn/` segment or, without one, from the hash
length; whether the instance enables it is the caller's check (`Instance.check_function`).
"""

from __future__ import annotations

from dataclasses import dataclass

from casbah.digest import Digest, DigestFunction, make_digest
from casbah.errors import InvalidArgument, echo

RESERVED = frozenset(
    {"blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs"}
)
COMPRESSORS = frozenset({"zstd", "deflate", "brotli"})
SERVED_COMPRESSORS = frozenset({"zstd"})
# A function segment: REAPI writes one only for functions a hash length cannot identify
# (blake3, sha256tree, gitsha1), but naming an inferable one (sha256/...) is unambiguous too.
_NAMED_FUNCTIONS = {f.value: f for f in DigestFunction}
_MAX_SIZE = (1 << 63) - 1  # Digest.size_bytes is an int64
_UNSUPPORTED_FUNCTIONS = {"vso", "murmur3"}


@dataclass(frozen=True, slots=True)
class ResourceName:
    instance: str
    digest: Digest
    compressor: str | None  # None = identity
    upload_id: str | None = None


def parse_read(name: str) -> ResourceName:
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part in ("blobs", "compressed-blobs"):
            return _parse_blob(name, parts[:i], parts[i:], None, allow_metadata=False)
        if part in RESERVED:
            break
    raise InvalidArgument(f"malformed read resource name {echo(name)}: want [INSTANCE/]blobs/HASH/SIZE")


def parse_write(name: str) -> ResourceName:
    parts = name.split("/")
    for i, part in enumerate(parts):
        if part == "uploads":
            if i + 2 >= len(parts) or not parts[i + 1]:
                break
            return _parse_blob(name, parts[:i], parts[i + 2 :], parts[i + 1], allow_metadata=True)
        if part in RESERVED:
            break
    raise InvalidArgument(
        f"malformed write resource name {echo(name)}: want [INSTANCE/]uploads/UUID/blobs/HASH/SIZE[/METADATA]"
    )


def _parse_blob(name: str, instance_parts: list[str], rest: list[str], upload_id: str | None,
                allow_metadata: bool) -> ResourceName:
    if any(p in RESERVED for p in instance_parts) or any(not p for p in instance_parts):
        raise InvalidArgument(f"malformed resource name {echo(name)}: bad instance name")
    instance = "/".join(instance_parts)
    compressor = None
    if rest and rest[0] == "compressed-blobs":
        if len(rest) < 2:
            raise InvalidArgument(f"malformed resource name {echo(name)}: missing compressor")
        compressor = rest[1]
        if compressor not in COMPRESSORS:
            raise InvalidArgument(f"unknown compressor {echo(compressor)} in resource name {echo(name)}")
        if compressor not in SERVED_COMPRESSORS:
            raise InvalidArgument(f"compressor {echo(compressor)} is not supported (supported: zstd)")
        rest = rest[2:]
    elif not rest or rest[0] != "blobs":
        raise InvalidArgument(f"malformed resource name {echo(name)}: expected 'blobs' or 'compressed-blobs'")
    else:
        rest = rest[1:]
    function: DigestFunction | None = None
    if rest and rest[0] in _NAMED_FUNCTIONS:
        function = _NAMED_FUNCTIONS[rest[0]]
        rest = rest[1:]
    elif rest and rest[0] in _UNSUPPORTED_FUNCTIONS:
        raise InvalidArgument(f"digest function {echo(rest[0])} is not supported by casbah")
    if len(rest) < 2 or (len(rest) > 2 and not allow_metadata):
        raise InvalidArgument(f"malformed resource name {echo(name)}: expected HASH/SIZE")
    hash_hex, size = rest[0], rest[1]
    if function is None:  # no segment: the hash length says which (64 hex: sha256, 40: sha1, ...)
        function = DigestFunction.infer(hash_hex)
    # ASCII digits only: str.isdigit() accepts '²' (int() then fails) and other scripts' digits.
    if not (size.isascii() and size.isdigit()) or int(size) > _MAX_SIZE:
        raise InvalidArgument(f"malformed resource name {echo(name)}: size {echo(size)} is not a valid blob size")
    return ResourceName(instance, make_digest(hash_hex, int(size), function), compressor, upload_id)
