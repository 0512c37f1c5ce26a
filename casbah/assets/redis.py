"""Asset index in Redis, shared by every server of a deployment.

Records are JSON strings; each URI and each (uri, qualifier, value) triple is a
set of record keys, so a lookup is one SINTER (or SMEMBERS) per URI plus one MGET.
"""

from __future__ import annotations

import json

from casbah.assets.index import AssetIndex, AssetKind, AssetRecord
from casbah.digest import Digest, DigestFunction
from casbah.redis_client import connect, translated


class RedisAssetIndex(AssetIndex):
    def __init__(self, url: str, instance: str = "", prefix: str = "casbah:asset:") -> None:
        self.url = url
        self.redis = connect(url)
        self.prefix = f"{prefix}{instance}:"

    def _rec(self, key: str) -> str:
        return f"{self.prefix}rec:{key}"

    def _uri(self, uri: str) -> str:
        return f"{self.prefix}uri:{uri}"

    def _pair(self, uri: str, name: str, value: str) -> str:
        return f"{self.prefix}q:{json.dumps([uri, name, value])}"

    @translated
    async def put(self, record: AssetRecord) -> None:
        r = record
        doc = json.dumps({
            "kind": r.kind.value, "fn": r.digest.function.value, "hash": r.digest.hash, "size": r.digest.size,
            "uris": r.uris, "qualifiers": r.qualifiers, "refs_blobs": [[d.hash, d.size] for d in r.references_blobs],
            "refs_dirs": [[d.hash, d.size] for d in r.references_directories], "pushed_at": r.pushed_at,
            "expire_at": r.expire_at,
        })
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(self._rec(r.key), doc)
            for uri in r.uris:
                pipe.sadd(self._uri(uri), r.key)
                for name, value in r.qualifiers:
                    pipe.sadd(self._pair(uri, name, value), r.key)
            await pipe.execute()

    @translated
    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str], function: str,
                         limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        keys: set[bytes] = set()
        for uri in uris:
            if qualifiers:
                keys |= await self.redis.sinter([self._pair(uri, n, v) for n, v in qualifiers.items()])
            else:
                keys |= await self.redis.smembers(self._uri(uri))
        if not keys:
            return []
        ordered = sorted(keys)
        docs = await self.redis.mget([self._rec(k.decode()) for k in ordered])
        out = []
        for key, doc in zip(ordered, docs, strict=True):
            if doc is None:
                continue
            d = json.loads(doc)
            if d["kind"] != kind.value or d["fn"] != function:
                continue
            f = DigestFunction(d["fn"])
            out.append(AssetRecord(
                kind=kind, uris=tuple(d["uris"]), qualifiers=tuple((n, v) for n, v in d["qualifiers"]),
                digest=Digest(d["hash"], d["size"], f),
                references_blobs=tuple(Digest(h, s, f) for h, s in d["refs_blobs"]),
                references_directories=tuple(Digest(h, s, f) for h, s in d["refs_dirs"]), pushed_at=d["pushed_at"],
                expire_at=d["expire_at"], key=key.decode(),
            ))
        out.sort(key=lambda rec: rec.pushed_at, reverse=True)
        return out[offset : None if limit is None else offset + limit]
