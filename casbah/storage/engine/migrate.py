"""Upgrading older stores: the file-per-blob layout, and layout 3 (one LMDB environment).

Layout 3 kept the `meta` records in `<path>/index/` beside the inline data; layout 4
moves them (and the quota counters) into `<path>/meta/` (`move_meta`).

Importing the old file-per-blob layout (`<path>/objects/<2 hex>/<key>`):

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
verifying store), were never servable and are removed.  Small blobs are hashed on the
way in (a verifying store): their index entry gets the checksum reads verify against
(check.py), which must not bless bytes that rotted in the old tree.  Large files are
renamed without reading them: their entries carry no checksum and reads verify them
by the digest function, as before.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING

import lmdb

from casbah.storage.engine.check import matches
from casbah.storage.engine.index import LAYOUT, key_of, layout_mark
from casbah.storage.keys import parse_key

if TYPE_CHECKING:
    from casbah.storage.engine.core import Engine, Entry
    from casbah.storage.engine.index import Env, Txn

log = logging.getLogger(__name__)

BATCH = 1000
#: Records copied per `meta` transaction when moving layout 3's records.
MOVE_BATCH = 50_000


def upgrade(engine: Engine) -> None:
    """Bring the store at `engine.root` to the current layout (called on open when the
    `meta` environment has no current layout mark)."""
    with engine.env.data_env.begin() as txn:
        old = txn.get(b"layout", db=engine.env.seqs)
    if old is not None and int.from_bytes(old, "little") >= 3:
        move_meta(engine)
    else:
        migrate(engine)


def move_meta(engine: Engine) -> int:
    """Layout 3 -> 4: copy `index/meta` and the counters into the `meta` environment.

    Runs inside a write transaction of the `index` environment, whose writer lock is
    cross-process: a second process opening the store meanwhile waits, then finds the
    work done.  The copy commits in batches; then the old `meta` database is dropped
    and `index` marked layout 4 in the outer transaction; the `meta` environment's
    layout mark is written last.  A crash before the outer commit leaves layout 3
    intact and the next open copies again from the start (clearing the partial copy);
    a crash after it leaves a complete copy that only needs its mark.  Returns the
    records copied."""
    env = engine.env
    started = time.monotonic()
    copied = 0
    with env.data_env.begin(write=True) as outer:
        mark = outer.get(b"layout", db=env.seqs)
        if mark is not None and int.from_bytes(mark, "little") == 3:
            with env.meta_env.begin(write=True) as txn:
                txn.drop(env.meta, delete=False)
                txn.drop(env.info, delete=False)
            try:
                old = env.data_env.open_db(b"meta", txn=outer, create=False)
            except lmdb.NotFoundError:
                old = None
            if old is not None:
                copied = _copy(env, outer, old)
                outer.drop(old, delete=True)
            with env.meta_env.begin(write=True) as txn:
                for name in (b"charged", b"objects"):
                    value = outer.get(name, db=env.seqs)
                    if value is not None:
                        txn.put(name, value, db=env.info)
            for name in (b"charged", b"objects"):
                outer.delete(name, db=env.seqs)
            outer.put(b"layout", layout_mark(), db=env.seqs)
    with env.meta_env.begin(write=True) as txn:
        txn.put(b"layout", layout_mark(), db=env.info)
    if copied:
        log.info("disk storage %s: moved %d index records into %s in %.1fs", engine.name, copied,
                 engine.root / "meta", time.monotonic() - started)
    return copied


def _copy(env: Env, outer: lmdb.Transaction, old: lmdb._Database) -> int:
    """Every record of `old` (read in `outer`) into `meta`, in key order (appended:
    full pages), `MOVE_BATCH` per transaction."""
    copied = 0
    cursor = outer.cursor(db=old)
    ok = cursor.first()
    while ok:
        with env.meta_env.begin(write=True) as txn:
            put = txn.put
            meta = env.meta
            n = 0
            while ok and n < MOVE_BATCH:
                put(cursor.key(), cursor.value(), db=meta, append=True)
                n += 1
                ok = cursor.next()
        copied += n
    cursor.close()
    return copied


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
    def mark(txn: Txn, _unlinks: list[str]) -> None:
        txn.put(b"layout", layout_mark(), db=engine.env.seqs)
        engine.env.set_counter(txn, b"layout", LAYOUT)  # in `meta`: committed last

    engine._write(mark, "marking the layout")
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
            if engine.verify and not matches(digest, data):
                return None  # rotted since it was written: the checksum added now must not bless it
            return (pos, key_of(digest), data, 0, None), len(data)
        final = engine.area.path(digest)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(entry.path, final)
        return (pos, key_of(digest), None, st.st_blocks * 512, None), st.st_size
    except FileNotFoundError:  # another process imported it first
        return None


def _commit(engine: Engine, batch: list[Entry], lengths: list[int]) -> int:
    errors = engine._write(lambda txn, unlinks: engine._add(txn, unlinks, batch, lengths), "importing")
    return len(batch) - len(errors)
