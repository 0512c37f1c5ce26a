"""Persistent asset index in SQLite: the default next to disk storage.

One connection, used from one dedicated thread (SQLite connections are not
thread-safe and the event loop must not block on the file).

Every push gets a new integer id, so "most recently pushed" is "highest id".
URIs and (URI, qualifier, value) triples live in side tables indexed by
(…, id), which lets a lookup walk one triple's entries newest first and stop at
the page it needs.  The walk is driven by the fetch's most selective qualifier
(the one with the fewest entries, probed with bounded counts) and checks the
others per candidate.  So an exact lookup among 10,000 variants of one URI
touches a handful of rows even when some of its qualifiers (say
`resource_type`) are shared by every variant, and a broad one reads only the
newest matches instead of materializing all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.digest import Digest, DigestFunction
from casbah.errors import from_os_error
from casbah.registry import KindOptions

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, kind TEXT NOT NULL, fn TEXT NOT NULL, hash TEXT NOT NULL,
    size INTEGER NOT NULL, uris TEXT NOT NULL, qualifiers TEXT NOT NULL, refs_blobs TEXT NOT NULL,
    refs_dirs TEXT NOT NULL, pushed_at REAL NOT NULL, expire_at REAL
);
CREATE TABLE IF NOT EXISTS asset_uris (uri TEXT NOT NULL, id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS asset_uris_uri ON asset_uris (uri, id);
CREATE INDEX IF NOT EXISTS asset_uris_id ON asset_uris (id);
CREATE TABLE IF NOT EXISTS asset_qualifiers (uri TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL,
                                             id INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS asset_qualifiers_pair ON asset_qualifiers (uri, name, value, id);
CREATE INDEX IF NOT EXISTS asset_qualifiers_id ON asset_qualifiers (id, uri, name, value);
"""
_COLUMNS = ("a.key, a.kind, a.fn, a.hash, a.size, a.uris, a.qualifiers, a.refs_blobs, a.refs_dirs, a.pushed_at, "
            "a.expire_at")
#: Entries counted per qualifier when choosing the one that drives a lookup.
_PROBE = 256


def _digests(items: tuple[Digest, ...]) -> str:
    return json.dumps([[d.hash, d.size] for d in items])


def _parse_digests(text: str, fn: DigestFunction) -> tuple[Digest, ...]:
    return tuple(Digest(h, s, fn) for h, s in json.loads(text))


class SqliteAssetIndex(AssetIndex):
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="casbah-assets")
        self._db = self._pool.submit(self._connect).result()

    def _connect(self) -> sqlite3.Connection:
        """Open (and on first use create) the index; several processes may race here
        (`serve --workers N`), and SQLite answers a racing journal-mode switch or schema
        creation with "database is locked" without waiting: retry for a while."""
        for attempt in range(100):
            try:
                return self._connect_once()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def _connect_once(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        old = version < SCHEMA_VERSION and db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'assets'").fetchone()
        if old:
            self._db = db
            self._migrate_v1()
        else:
            db.executescript(_SCHEMA)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return db

    def _migrate_v1(self) -> None:
        """Version 1 keyed side tables by the text key; re-insert its records in push order."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("ALTER TABLE assets RENAME TO assets_v1")
            db.execute("DROP TABLE IF EXISTS asset_uris")
            db.execute("DROP TABLE IF EXISTS asset_qualifiers")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM assets_v1 a ORDER BY a.pushed_at").fetchall()
            for row in rows:
                self._insert(self._record(row))
            db.execute("DROP TABLE assets_v1")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        log.info("asset index %s: migrated %d records to schema %d", self.path, len(rows), SCHEMA_VERSION)

    async def _run(self, fn, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        except (sqlite3.Error, OSError) as exc:
            raise from_os_error(exc, f"asset index {self.path}") from exc

    async def put(self, record: AssetRecord) -> None:
        await self._run(self._put, record)

    def _put(self, r: AssetRecord) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            self._insert(r)
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        """Undo an open transaction, never masking the error that ended it: SQLite rolls
        back by itself on some errors (FULL, IOERR), and a ROLLBACK then fails with "no
        transaction is active", which must not replace "database or disk is full"."""
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("asset index %s: rollback failed: %s", self.path, exc)

    async def purge_expired(self, now: float) -> int:
        return await self._run(self._purge_expired, now)

    def _purge_expired(self, now: float) -> int:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            ids = [row[0] for row in db.execute(
                "SELECT id FROM assets WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT 10000", (now,))]
            for table in ("assets", "asset_uris", "asset_qualifiers"):
                db.executemany(f"DELETE FROM {table} WHERE id = ?", [(i,) for i in ids])
            db.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        return len(ids)

    def _insert(self, r: AssetRecord) -> None:
        """Replace the record with the same key; the new row gets the highest id (newest)."""
        db = self._db
        old = db.execute("SELECT id FROM assets WHERE key = ?", (r.key,)).fetchone()
        if old is not None:
            for table in ("assets", "asset_uris", "asset_qualifiers"):
                db.execute(f"DELETE FROM {table} WHERE id = ?", old)
        cursor = db.execute(
            "INSERT INTO assets (key, kind, fn, hash, size, uris, qualifiers, refs_blobs, refs_dirs, pushed_at,"
            " expire_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (r.key, r.kind.value, r.digest.function.value, r.digest.hash, r.digest.size, json.dumps(r.uris),
             json.dumps(r.qualifiers), _digests(r.references_blobs), _digests(r.references_directories),
             r.pushed_at, r.expire_at),
        )
        rowid = cursor.lastrowid
        db.executemany("INSERT INTO asset_uris VALUES (?,?)", [(u, rowid) for u in r.uris])
        db.executemany(
            "INSERT INTO asset_qualifiers VALUES (?,?,?,?)",
            [(u, n, v, rowid) for u in r.uris for n, v in r.qualifiers],
        )

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        return await self._run(self._candidates, kind, uris, qualifiers, function, limit, offset)

    def _candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                    function: str, limit: int | None, offset: int) -> list[AssetRecord]:
        want = -1 if limit is None else offset + limit
        found: dict[int, tuple] = {}
        pairs = list(qualifiers.items())
        for uri in uris:
            if pairs:
                # Bounded counts: which qualifier has the fewest entries under this URI.
                probes = ", ".join(
                    [f"(SELECT count(*) FROM (SELECT 1 FROM asset_qualifiers WHERE uri = ? AND name = ? "
                     f"AND value = ? LIMIT {_PROBE}))"] * len(pairs))
                counts = self._db.execute(
                    f"SELECT {probes}", [x for n, v in pairs for x in (uri, n, v)]).fetchone()
                if not all(counts):
                    continue
                order = sorted(range(len(pairs)), key=counts.__getitem__)
                (name, value), others = pairs[order[0]], [pairs[i] for i in order[1:]]
                checks = "".join(
                    " AND EXISTS (SELECT 1 FROM asset_qualifiers x WHERE x.id = d.id AND x.uri = ? "
                    "AND x.name = ? AND x.value = ?)" for _ in others
                )
                sql = (f"SELECT a.id, {_COLUMNS} FROM asset_qualifiers d JOIN assets a ON a.id = d.id "
                       f"WHERE d.uri = ? AND d.name = ? AND d.value = ? AND a.kind = ? AND a.fn = ?{checks} "
                       "ORDER BY d.id DESC LIMIT ?")
                args = [uri, name, value, kind.value, str(function),
                        *(x for n, v in others for x in (uri, n, v)), want]
            else:
                sql = (f"SELECT a.id, {_COLUMNS} FROM asset_uris d JOIN assets a ON a.id = d.id "
                       "WHERE d.uri = ? AND a.kind = ? AND a.fn = ? ORDER BY d.id DESC LIMIT ?")
                args = [uri, kind.value, str(function), want]
            for row in self._db.execute(sql, args):
                found[row[0]] = row[1:]
        ids = sorted(found, reverse=True)
        ids = ids[offset:] if limit is None else ids[offset:offset + limit]
        return [self._record(found[i]) for i in ids]

    @staticmethod
    def _record(row: tuple) -> AssetRecord:
        key, kind, fn, hash_, size, uris, quals, refs_b, refs_d, pushed_at, expire_at = row
        function = DigestFunction(fn)
        return AssetRecord(
            kind=AssetKind(kind), uris=tuple(json.loads(uris)),
            qualifiers=tuple((n, v) for n, v in json.loads(quals)), digest=Digest(hash_, size, function),
            references_blobs=_parse_digests(refs_b, function),
            references_directories=_parse_digests(refs_d, function),
            pushed_at=pushed_at, expire_at=expire_at, key=key,
        )

    async def close(self) -> None:
        await self._run(self._db.close)
        self._pool.shutdown(wait=True)


class SqliteIndexOptions(KindOptions):
    #: The index file; default: one file per instance under data-dir/assets/.
    path: str | None = None


def index_file(instance: str) -> str:
    """One SQLite file per instance; percent-encoding keeps distinct names distinct."""
    return "default.sqlite" if not instance else f"i_{quote(instance, safe='')}.sqlite"


@ASSET_INDEX.register("sqlite", SqliteIndexOptions)
def _build(options: SqliteIndexOptions, context: IndexContext) -> AssetIndex:
    return SqliteAssetIndex(options.path or context.data_dir / "assets" / index_file(context.instance))
