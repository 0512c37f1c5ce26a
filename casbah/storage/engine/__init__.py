"""The persistent local storage engine behind the `disk` kind (docs/storage-engine.md).

`index.py` the LMDB schema, `quota.py` costs and eviction, `upkeep.py` uses,
listing, stats and scrubbing, `files.py` large blobs as files, `migrate.py` the
import of the old file-per-blob layout, `core.py` the `Engine` that ties them together.
"""

from casbah.storage.engine.core import INLINE_MAX, Engine

__all__ = ["INLINE_MAX", "Engine"]


def stored_blobs(root: str) -> dict[str, int]:
    """Every blob of the store at `root` by storage key (`Digest.key`) and length: for
    tools and tests that look into a store another process serves (LMDB readers are safe
    beside a writer in another process)."""
    engine = Engine(root)
    try:
        return {digest.key: record.length for digest, record in engine.iterate()}
    finally:
        engine.close()
