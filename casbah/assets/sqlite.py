"""Persistent asset index in SQLite: the default next to disk storage.

One connection, used from one dedicated thread (SQLite connections are not
thread-safe and the event loop must not block on the file).  URIs and qualifier
pairs live in their own indexed tables, so a lookup is an INTERSECT of index
range scans, fast with many qualifier variants under one URI.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from casbah.assets.index import AssetIndex, AssetKind, AssetRecord
from casbah.digest import Digest, DigestFunction

_SCHEMA = """
CREATE TABLE IF NOT EXISTS assets (
    key TEXT PRIMARY KEY, kind TEXT NOT NULL, fn TEXT NOT NULL, hash TEXT NOT NULL, size INTEGER NOT NULL,
    uris TEXT NOT NULL, qualifiers TEXT NOT NULL, refs_blobs TEXT NOT NULL, refs_dirs TEXT NOT NULL,
    pushed_at REAL NOT NULL, expire_at REAL
);
CREATE TABLE IF NOT EXISTS asset_uris (key TEXT NOT NULL, uri TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS asset_uris_uri ON asset_uris (uri, key);
CREATE INDEX IF NOT EXISTS asset_uris_key ON asset_uris (key);
CREATE TABLE IF NOT EXISTS asset_qualifiers (key TEXT NOT NULL, uri TEXT NOT NULL, name TEXT NOT NULL,
                                             value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS asset_qualifiers_pair ON asset_qualifiers (uri, name, value, key);
CREATE INDEX IF NOT EXISTS asset_qualifiers_key ON asset_qualifiers (key);
"""


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
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        return db

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def put(self, record: AssetRecord) -> None:
        await self._run(self._put, record)

    def _put(self, r: AssetRecord) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("assets", "asset_uris", "asset_qualifiers"):
                db.execute(f"DELETE FROM {table} WHERE key = ?", (r.key,))
            db.execute(
                "INSERT INTO assets VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (r.key, r.kind.value, r.digest.function.value, r.digest.hash, r.digest.size, json.dumps(r.uris),
                 json.dumps(r.qualifiers), _digests(r.references_blobs), _digests(r.references_directories),
                 r.pushed_at, r.expire_at),
            )
            db.executemany("INSERT INTO asset_uris VALUES (?,?)", [(r.key, u) for u in r.uris])
            db.executemany(
                "INSERT INTO asset_qualifiers VALUES (?,?,?,?)",
                [(r.key, u, n, v) for u in r.uris for n, v in r.qualifiers],
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                         function: str, limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        return await self._run(self._candidates, kind, uris, qualifiers, function, limit, offset)

    def _candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str],
                    function: str, limit: int | None, offset: int) -> list[AssetRecord]:
        # One statement: per URI the INTERSECT of its qualifier pairs (each an index
        # range scan), UNION over URIs, then only the requested page of full rows is
        # read and decoded.  Each per-URI part is its own subquery because SQLite
        # evaluates chained compound operators left to right, with no precedence.
        parts: list[str] = []
        args: list[object] = []
        for uri in uris:
            if qualifiers:
                inner = " INTERSECT ".join(
                    ["SELECT key FROM asset_qualifiers WHERE uri = ? AND name = ? AND value = ?"] * len(qualifiers)
                )
                parts.append(f"SELECT key FROM ({inner})")
                args.extend(x for n, v in qualifiers.items() for x in (uri, n, v))
            else:
                parts.append("SELECT key FROM asset_uris WHERE uri = ?")
                args.append(uri)
        if not parts:
            return []
        rows = self._db.execute(
            f"SELECT * FROM assets WHERE key IN ({' UNION '.join(parts)}) AND kind = ? AND fn = ? "
            "ORDER BY pushed_at DESC, key DESC LIMIT ? OFFSET ?",
            [*args, kind.value, str(function), -1 if limit is None else limit, offset],
        ).fetchall()
        return [self._record(row) for row in rows]

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
