"""Asset index in PostgreSQL, shared by every server of a deployment.

Same model as the SQLite index: one row per asset, URIs and (uri, qualifier,
value) triples in indexed side tables, a lookup = INTERSECT of index scans.

"Most recently pushed" is push order as the database saw it: every put takes a
new `seq` from a sequence (a re-push of the same names too), so the order is the
same for every server whatever their clocks say.  Pushes of the same names are
serialized by an advisory lock on the key, so two servers pushing at once never
collide on the primary key.
"""

from __future__ import annotations

import json

from pydantic import Field

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.digest import Digest, DigestFunction
from casbah.postgres_client import PgClient
from casbah.registry import KindOptions

_DDL = """
CREATE SEQUENCE IF NOT EXISTS casbah_assets_seq;
CREATE TABLE IF NOT EXISTS casbah_assets (
    seq BIGINT NOT NULL DEFAULT nextval('casbah_assets_seq'), instance TEXT NOT NULL, key TEXT NOT NULL,
    kind TEXT NOT NULL, fn TEXT NOT NULL, hash TEXT NOT NULL, size BIGINT NOT NULL, uris JSONB NOT NULL,
    qualifiers JSONB NOT NULL, refs_blobs JSONB NOT NULL,
    refs_dirs JSONB NOT NULL, pushed_at DOUBLE PRECISION NOT NULL, expire_at DOUBLE PRECISION,
    PRIMARY KEY (instance, key)
);
-- Tables made before push order was a sequence (ordered by pushed_at) get the column.
ALTER TABLE casbah_assets ADD COLUMN IF NOT EXISTS seq BIGINT NOT NULL DEFAULT nextval('casbah_assets_seq');
CREATE INDEX IF NOT EXISTS casbah_assets_seq_idx ON casbah_assets (instance, seq);
CREATE TABLE IF NOT EXISTS casbah_asset_uris (instance TEXT NOT NULL, key TEXT NOT NULL, uri TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS casbah_asset_uris_uri ON casbah_asset_uris (instance, uri, key);
CREATE INDEX IF NOT EXISTS casbah_asset_uris_key ON casbah_asset_uris (instance, key);
CREATE TABLE IF NOT EXISTS casbah_asset_qualifiers (
    instance TEXT NOT NULL, key TEXT NOT NULL, uri TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS casbah_asset_q_pair ON casbah_asset_qualifiers (instance, uri, name, value, key);
CREATE INDEX IF NOT EXISTS casbah_asset_q_key ON casbah_asset_qualifiers (instance, key);
"""


def _digests(items: tuple[Digest, ...]) -> str:
    return json.dumps([[d.hash, d.size] for d in items])


class PostgresAssetIndex(AssetIndex):
    def __init__(self, url: str, instance: str = "") -> None:
        self.url = url
        self.instance = instance
        self.db = PgClient(url)

    async def put(self, record: AssetRecord) -> None:
        await self.db.ensure_schema("assets", _DDL)
        r, inst = record, self.instance

        async def q(conn):
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"casbah:asset:{inst}:{r.key}",))
                for table in ("casbah_assets", "casbah_asset_uris", "casbah_asset_qualifiers"):
                    await conn.execute(f"DELETE FROM {table} WHERE instance = %s AND key = %s", (inst, r.key))
                await conn.execute(
                    "INSERT INTO casbah_assets (instance, key, kind, fn, hash, size, uris, qualifiers, refs_blobs,"
                    " refs_dirs, pushed_at, expire_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (inst, r.key, r.kind.value, r.digest.function.value, r.digest.hash, r.digest.size,
                     json.dumps(r.uris), json.dumps(r.qualifiers), _digests(r.references_blobs),
                     _digests(r.references_directories), r.pushed_at, r.expire_at),
                )
                async with conn.cursor() as cur:
                    await cur.executemany("INSERT INTO casbah_asset_uris VALUES (%s,%s,%s)",
                                          [(inst, r.key, u) for u in r.uris])
                    if r.qualifiers:
                        await cur.executemany(
                            "INSERT INTO casbah_asset_qualifiers VALUES (%s,%s,%s,%s,%s)",
                            [(inst, r.key, u, n, v) for u in r.uris for n, v in r.qualifiers],
                        )

        await self.db.run(q)

    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str], function: str,
                         limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        if not uris:
            return []
        await self.db.ensure_schema("assets", _DDL)
        inst = self.instance
        parts, args = [], []
        for uri in uris:
            if qualifiers:
                sub = " INTERSECT ".join(
                    ["SELECT key FROM casbah_asset_qualifiers WHERE instance = %s AND uri = %s AND name = %s "
                     "AND value = %s"] * len(qualifiers)
                )
                parts.append(f"({sub})")
                for n, v in qualifiers.items():
                    args += [inst, uri, n, v]
            else:
                parts.append("(SELECT key FROM casbah_asset_uris WHERE instance = %s AND uri = %s)")
                args += [inst, uri]
        keys_sql = " UNION ".join(parts)
        sql = (f"SELECT key, kind, fn, hash, size, uris, qualifiers, refs_blobs, refs_dirs, pushed_at, expire_at "
               f"FROM casbah_assets WHERE instance = %s AND kind = %s AND fn = %s AND key IN ({keys_sql}) "
               f"ORDER BY seq DESC LIMIT %s OFFSET %s")
        params = [inst, kind.value, str(function), *args, limit, offset]

        async def q(conn):
            cur = await conn.execute(sql, params)
            return await cur.fetchall()

        rows = await self.db.run(q)
        out = []
        for key, kind_, fn, hash_, size, uris_, quals, refs_b, refs_d, pushed_at, expire_at in rows:
            f = DigestFunction(fn)
            out.append(AssetRecord(
                kind=AssetKind(kind_), uris=tuple(uris_), qualifiers=tuple((n, v) for n, v in quals),
                digest=Digest(hash_, size, f), references_blobs=tuple(Digest(h, s, f) for h, s in refs_b),
                references_directories=tuple(Digest(h, s, f) for h, s in refs_d), pushed_at=pushed_at,
                expire_at=expire_at, key=key,
            ))
        return out

    async def purge_expired(self, now: float) -> int:
        await self.db.ensure_schema("assets", _DDL)
        inst = self.instance

        async def q(conn):
            async with conn.transaction():
                cur = await conn.execute(
                    "DELETE FROM casbah_assets WHERE instance = %s AND expire_at IS NOT NULL AND expire_at <= %s "
                    "RETURNING key", (inst, now))
                keys = [row[0] for row in await cur.fetchall()]
                for table in ("casbah_asset_uris", "casbah_asset_qualifiers"):
                    await conn.execute(f"DELETE FROM {table} WHERE instance = %s AND key = ANY(%s)", (inst, keys))
                return len(keys)

        return await self.db.run(q)

    async def close(self) -> None:
        await self.db.close()


class PostgresAssetIndexOptions(KindOptions):
    url: str = Field(min_length=1)


@ASSET_INDEX.register("postgres", PostgresAssetIndexOptions)
def _build(options: PostgresAssetIndexOptions, context: IndexContext) -> AssetIndex:
    return PostgresAssetIndex(options.url, context.instance)
