"""From a bare SHA-256 (the HTTP protocol's blob name) to a digest with its size.

casbah's storage names a blob by hash *and* size, as the REAPI does; Bazel's HTTP
protocol names it by hash alone.  Sizes come, cheapest first, from:

1. what this process has seen: blobs PUT over HTTP, and every digest named by an
   ActionResult served over HTTP (after an `/ac/` hit Bazel GETs exactly those);
2. the storage itself, for blobs written over gRPC: nodes that can look a hash up
   (`find_by_hash`: disk looks up its index, memory scans) are asked, through
   the decorators above them.  Nodes that cannot (remote, S3, Redis) answer "unknown",
   and such a blob is a 404 over HTTP until something names its size.
"""

from __future__ import annotations

from collections import OrderedDict

from casbah.digest import Digest, DigestFunction
from casbah.storage.base import Storage

#: Hash -> size entries remembered (~150 bytes each: ~150 MB at the cap).
MAX_ENTRIES = 1_000_000


class SizeIndex:
    """A bounded LRU map from SHA-256 hash to size, shared by every instance (a hash
    has one size whatever the instance)."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._sizes: OrderedDict[str, int] = OrderedDict()

    def remember(self, digest: Digest) -> None:
        if digest.function is not DigestFunction.SHA256:
            return
        self._sizes[digest.hash] = digest.size
        self._sizes.move_to_end(digest.hash)
        if len(self._sizes) > self.max_entries:
            self._sizes.popitem(last=False)

    async def resolve(self, cas: Storage, hash_hex: str) -> Digest | None:
        """The digest of the stored blob with this hash, or None when none is known."""
        size = self._sizes.get(hash_hex)
        if size is not None:
            return Digest(hash_hex, size, DigestFunction.SHA256)
        found = await _find_by_hash(cas, hash_hex, set())
        if found is not None:
            self.remember(found)
        return found


async def _find_by_hash(node: Storage, hash_hex: str, seen: set[int]) -> Digest | None:
    if id(node) in seen:
        return None
    seen.add(id(node))
    lookup = getattr(node, "find_by_hash", None)
    if lookup is not None:
        return await lookup(hash_hex, DigestFunction.SHA256)
    inner = getattr(node, "inner", None)  # the metrics wrapper: transparent
    children = [inner] if isinstance(inner, Storage) else list(node.children())
    for child in children:
        found = await _find_by_hash(child, hash_hex, seen)
        if found is not None:
            return found
    return None
