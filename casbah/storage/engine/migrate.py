"""Importing the old file-per-blob layout (`<path>/objects/<2 hex>/<key>`) into the engine.

Runs on the first open of a directory whose index has no layout mark (a new store
too: then there is nothing to import), or explicitly by `casbah admin migrate`.
Streaming and bounded: the old tree is walked with `scandir`, one prefix directory
at a time, and entries are committed `BATCH` at a time.  Small blobs are read into
the index and their files removed; large ones are renamed into `files/` (same
filesystem: no copy).  Partial uploads in the old `tmp/` are dropped.  A second
process opening the store meanwhile waits for LMDB's write lock per batch and finds
nothing left to import for the files already moved; the old tree is removed at the
end, and the layout mark written, so later opens do not look again (O(1) startup).

Files whose names are not keys, or whose size differs from their key's size (in a
verifying store), were never servable and are removed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

from casbah.storage.engine.index import LAYOUT, key_of
from casbah.storage.keys import parse_key

if TYPE_CHECKING:
    from casbah.storage.engine.core import Engine, Entry

log = logging.getLogger(__name__)

BATCH = 1000


def migrate(engine: Engine) -> int:
    """Import `<root>/objects` if present; mark the layout current.  Returns blobs imported."""
    started = time.monotonic()
    old = engine.root / "objects"
    imported = 0
    dropped = 0
    if old.is_dir():
        batch: list[Entry] = []
        lengths: list[int] = []
        for prefix in sorted(os.scandir(old), key=lambda e: e.name):
            if not prefix.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(prefix.path):
                item = _import_one(engine, entry, len(batch))
                if item is None:
                    dropped += 1
                    continue
                batch.append(item[0])
                lengths.append(item[1])
                if len(batch) >= BATCH:
                    imported += _commit(engine, batch, lengths)
                    batch, lengths = [], []
        if batch:
            imported += _commit(engine, batch, lengths)
        shutil.rmtree(old, ignore_errors=True)
        log.info("disk storage %s: imported %d blobs from the file-per-blob layout (%d unusable files "
                 "removed) in %.1fs", engine.name, imported, dropped, time.monotonic() - started)
    for stale in ("journal",):
        try:
            os.unlink(engine.root / stale)
        except FileNotFoundError:
            pass
    engine._write(lambda txn, _u: engine.env.set_counter(txn, b"layout", LAYOUT), "marking the layout")
    return imported


def _import_one(engine: Engine, entry: os.DirEntry, pos: int) -> tuple[Entry, int] | None:
    digest = parse_key(entry.name)
    try:
        st = entry.stat(follow_symlinks=False)
        if (digest is None or not entry.is_file(follow_symlinks=False)
                or (engine.verify and st.st_size != digest.size)):
            os.unlink(entry.path)
            return None
        if st.st_size <= engine.inline_max:
            with open(entry.path, "rb") as f:
                data = f.read()
            os.unlink(entry.path)
            return (pos, key_of(digest), data, 0, None), len(data)
        final = engine.area.path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(entry.path, final)
        return (pos, key_of(digest), None, st.st_blocks * 512, None), st.st_size
    except FileNotFoundError:  # another process imported it first
        return None


def _commit(engine: Engine, batch: list[Entry], lengths: list[int]) -> int:
    errors = engine._write(lambda txn, unlinks: engine._add(txn, unlinks, batch, lengths), "importing")
    return len(batch) - len(errors)  # type: ignore[arg-type]
