"""The persistent local storage engine behind the `disk` kind (docs/storage-engine.md).

`index.py` the LMDB schema, `quota.py` costs and eviction, `files.py` large blobs
as files, `migrate.py` the import of the old file-per-blob layout, `core.py` the
`Engine` that ties them together.
"""

from casbah.storage.engine.core import INLINE_MAX, Engine

__all__ = ["INLINE_MAX", "Engine"]
