"""One transaction over the engine's two LMDB environments (`index.py` says what each holds)."""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, cast

import lmdb

if TYPE_CHECKING:
    from casbah.storage.engine.index import Env
    from casbah.storage.engine.presence import Presence

_LE64 = struct.Struct("<Q")


class Txn:
    """One transaction over both environments, routed by database handle, so the
    engine's code reads as if there were one environment.

    Write: `order`'s write lock first, then `meta`'s; commit `order` first, then `meta`
    (the `meta` commit is the moment a write becomes visible).  Read: `meta` first; the
    `order` snapshot, taken later and only when needed, is at least as new, so an entry
    a record points at is there unless it was deleted since (then: missing)."""

    __slots__ = ("_added", "_buffers", "_data", "_env", "_held", "_meta", "_removed", "_retired", "_write")

    def __init__(self, env: Env, write: bool, buffers: bool = False) -> None:
        self._env = env
        self._write = write
        self._buffers = buffers
        self._data: lmdb.Transaction | None = None
        self._retired: list[bytes] = []
        self._held: Presence | None = None
        if write:
            # The presence table's lock before LMDB's write locks, held until the table
            # matches what `meta` committed (presence.py: why it stays exact).
            self._added: dict[bytes, int] = {}
            self._removed: list[bytes] = []
            self._held = env.presence
            if self._held is not None:
                self._held.acquire()
            try:
                self._data = env.data_env.begin(write=True)
                try:
                    self._meta = env.meta_env.begin(write=True)
                except BaseException:
                    self._data.abort()
                    raise
            except BaseException:
                self._unlock()
                raise
        else:
            self._meta = env.meta_env.begin()

    def _unlock(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def _txn(self, db: lmdb._Database) -> lmdb.Transaction:
        if db is self._env.meta or db is self._env.info:
            return self._meta
        if self._data is None:
            data_env = self._env.data_env
            self._data = data_env.begin(buffers=True) if self._buffers else data_env.begin()
        return self._data

    @property
    def meta_txn(self) -> lmdb.Transaction:
        return self._meta

    @property
    def data_txn(self) -> lmdb.Transaction:
        return self._txn(self._env.order)

    def get(self, key: bytes, db: lmdb._Database) -> bytes | None:
        return cast("bytes | None", self._txn(db).get(key, db=db))  # no `buffers=True`: always bytes

    def put(self, key: bytes, value: bytes | memoryview, db: lmdb._Database, append: bool = False) -> bool:
        if db is self._env.meta:
            self._added[key] = _LE64.unpack_from(value, 8)[0]  # the record's position in `order`
        return self._txn(db).put(key, value, db=db, append=append)

    def delete(self, key: bytes, db: lmdb._Database) -> bool:
        if db is self._env.meta:
            self._added.pop(key, None)
            self._removed.append(key)
        return self._txn(db).delete(key, db=db)

    def cursor(self, db: lmdb._Database) -> lmdb.Cursor:
        return self._txn(db).cursor(db=db)

    def stat(self, db: lmdb._Database) -> dict:
        return dict(self._txn(db).stat(db))

    def retire(self, skey: bytes) -> None:
        """Delete an `order` entry a record is moving away from (a refresh, a re-upload)
        only after `meta` committed the record's new position: a reader whose `meta`
        snapshot still holds the old position finds the old entry, never a gap that
        would read as missing."""
        self._retired.append(skey)

    def commit(self) -> None:
        presence = self._held
        try:
            try:
                if self._data is not None:
                    self._data.commit()
            except BaseException:
                self._meta.abort()
                raise
            if presence is not None and self._removed:
                presence.removed(self._removed)  # before `meta` forgets them
            self._meta.commit()
            if presence is not None and self._added:
                presence.added(self._added)  # once `meta` holds them
        finally:
            self._unlock()
        if self._retired:
            self._delete_retired()

    def _delete_retired(self) -> None:
        """A second, short `order` transaction.  If it fails (a full disk) or the process
        dies first, the entries stay as orphans: no record points at them, so eviction
        and scrub remove them (`sweep_orphans`)."""
        retired, self._retired = self._retired, []
        try:
            with self._env.data_env.begin(write=True, db=self._env.order) as txn:
                for skey in retired:
                    txn.delete(skey)
        except lmdb.Error:
            pass

    def abort(self) -> None:
        try:
            if self._data is not None:
                self._data.abort()
            self._meta.abort()
        finally:
            self._unlock()

    def __enter__(self) -> Txn:
        return self

    def __exit__(self, kind: object, value: object, tb: object) -> None:
        if kind is None and self._write:
            self.commit()
        else:
            self.abort()
