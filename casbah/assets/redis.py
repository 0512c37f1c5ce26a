"""Asset index in Redis, shared by every server of a deployment.

Records are JSON strings.  Each (kind, function, URI) and each (kind, function,
URI, qualifier, value) is a sorted set of record keys scored by push sequence: a
counter every put increments, so "most recently pushed" is the order Redis saw
the pushes, the same for every server whatever their clocks say (a re-push of
the same names takes a new, higher score).  A put is one Lua script: the counter,
the record and every set change atomically.

A lookup per URI is ZREVRANGE of the URI's set (no qualifiers asked), reading
only the page it needs, or ZINTER of the asked qualifiers' sets; candidates of
all URIs are merged newest first, and only the requested page of records is
fetched.
"""

from __future__ import annotations

import json

from pydantic import Field

from casbah.assets.index import ASSET_INDEX, AssetIndex, AssetKind, AssetRecord, IndexContext
from casbah.digest import Digest, DigestFunction
from casbah.redis_client import connect, release, translated
from casbah.registry import KindOptions

#: KEYS[1] = counter, KEYS[2] = record, KEYS[3..] = sorted sets; ARGV[1] = record JSON
#: without its sequence (spliced in here), ARGV[2] = record key.
_PUT = """
local seq = redis.call('INCR', KEYS[1])
redis.call('SET', KEYS[2], string.sub(ARGV[1], 1, -2) .. ',"seq":' .. seq .. '}')
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], seq, ARGV[2])
end
return seq
"""


class RedisAssetIndex(AssetIndex):
    def __init__(self, url: str, instance: str = "", prefix: str = "casbah:asset:") -> None:
        self.url = url
        self.redis = connect(url)
        # json.dumps keeps any instance name (even one containing ':') a distinct prefix.
        self.prefix = f"{prefix}{json.dumps(instance)}:"
        self._put = self.redis.register_script(_PUT)

    def _rec(self, key: str) -> str:
        return f"{self.prefix}rec:{key}"

    def _uri(self, kind: str, fn: str, uri: str) -> str:
        return f"{self.prefix}u:{json.dumps([kind, fn, uri])}"

    def _pair(self, kind: str, fn: str, uri: str, name: str, value: str) -> str:
        return f"{self.prefix}q:{json.dumps([kind, fn, uri, name, value])}"

    @translated
    async def put(self, record: AssetRecord) -> None:
        r = record
        kind, fn = r.kind.value, r.digest.function.value
        doc = json.dumps({
            "kind": kind, "fn": fn, "hash": r.digest.hash, "size": r.digest.size,
            "uris": r.uris, "qualifiers": r.qualifiers, "refs_blobs": [[d.hash, d.size] for d in r.references_blobs],
            "refs_dirs": [[d.hash, d.size] for d in r.references_directories], "pushed_at": r.pushed_at,
            "expire_at": r.expire_at,
        })
        sets = []
        for uri in r.uris:
            sets.append(self._uri(kind, fn, uri))
            sets += [self._pair(kind, fn, uri, name, value) for name, value in r.qualifiers]
        await self._put(keys=[f"{self.prefix}seq", self._rec(r.key), *sets], args=[doc, r.key])

    @translated
    async def candidates(self, kind: AssetKind, uris: list[str], qualifiers: dict[str, str], function: str,
                         limit: int | None = None, offset: int = 0) -> list[AssetRecord]:
        want = None if limit is None else offset + limit
        if want == 0:
            return []
        fn = str(function)
        scores: dict[bytes, float] = {}
        for uri in uris:
            if qualifiers:
                found = await self.redis.zinter(
                    [self._pair(kind.value, fn, uri, n, v) for n, v in qualifiers.items()], aggregate="MAX",
                    withscores=True)
            else:
                found = await self.redis.zrevrange(self._uri(kind.value, fn, uri), 0, -1 if want is None else want - 1,
                                                   withscores=True)
            for key, score in found:
                scores[key] = max(score, scores.get(key, score))
        keys = sorted(scores, key=scores.__getitem__, reverse=True)[offset:want]
        if not keys:
            return []
        docs = await self.redis.mget([self._rec(k.decode()) for k in keys])
        out = []
        for key, doc in zip(keys, docs, strict=True):
            if doc is None:
                continue
            d = json.loads(doc)
            f = DigestFunction(d["fn"])
            out.append(AssetRecord(
                kind=kind, uris=tuple(d["uris"]), qualifiers=tuple((n, v) for n, v in d["qualifiers"]),
                digest=Digest(d["hash"], d["size"], f),
                references_blobs=tuple(Digest(h, s, f) for h, s in d["refs_blobs"]),
                references_directories=tuple(Digest(h, s, f) for h, s in d["refs_dirs"]), pushed_at=d["pushed_at"],
                expire_at=d["expire_at"], key=key.decode(),
            ))
        return out

    @translated
    async def purge_expired(self, now: float) -> int:
        """Expired records go from the sets and the record keys.  Push time orders the sets,
        not expiry, so the scan walks every record key of this instance (SCAN, in pages)."""
        purged = 0
        async for name in self.redis.scan_iter(match=f"{self.prefix}rec:*", count=500):
            doc = await self.redis.get(name)
            if doc is None:
                continue
            d = json.loads(doc)
            if d.get("expire_at") is None or d["expire_at"] > now:
                continue
            key = name.decode().removeprefix(f"{self.prefix}rec:") if isinstance(name, bytes) else \
                name.removeprefix(f"{self.prefix}rec:")
            sets = []
            for uri in d["uris"]:
                sets.append(self._uri(d["kind"], d["fn"], uri))
                sets += [self._pair(d["kind"], d["fn"], uri, n, v) for n, v in d["qualifiers"]]
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(name)
                for s in sets:
                    pipe.zrem(s, key)
                await pipe.execute()
            purged += 1
        return purged

    async def close(self) -> None:
        await release(self.url, self.redis)


class RedisAssetIndexOptions(KindOptions):
    url: str = Field(min_length=1)


@ASSET_INDEX.register("redis", RedisAssetIndexOptions)
def _build(options: RedisAssetIndexOptions, context: IndexContext) -> AssetIndex:
    return RedisAssetIndex(options.url, context.instance)
