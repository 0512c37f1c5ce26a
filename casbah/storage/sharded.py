"""`sharded`: blobs spread over N backends by weighted rendezvous hashing.

Each blob goes to the shard with the highest score `-weight / ln(h)`, where `h`
is a per-(shard, digest) hash mapped into (0, 1).  Adding a shard moves only the
blobs it now wins (its fair share); removing one moves only its own blobs.  Bulk
calls are split per shard and run concurrently.

Shards are listed under `shards:` (any storage node each, with an optional
`weight` and a stable `key`), and/or given as `shards-from:`, a comma-separated
list of REAPI server URLs (typically `${CASBAH_SHARDS}` from the environment),
each of which becomes a `remote` shard keyed by its URL, with `shard-defaults:`
(any `remote` option: retries, TLS files, ...) applied to all of them.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from casbah.config import ConfigError
from casbah.digest import Digest
from casbah.storage.base import Storage
from casbah.storage.loader import NodeOptions, StorageLoader, register
from casbah.storage.partitioned import PartitionedStorage

_MASK = (1 << 64) - 1


class ShardedStorage(PartitionedStorage):
    kind = "sharded"

    def __init__(self, shards: list[tuple[str, Storage, float]], **kwargs) -> None:
        if not shards:
            raise ValueError("sharded storage needs at least one shard")
        super().__init__([store for _, store, _ in shards], **kwargs)
        self.shards = self.parts
        self.weights = [weight for _, _, weight in shards]
        # A shard's identity is its key, not its position: reordering the list moves nothing.
        self.seeds = [int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") for key, _, _ in shards]
        self._equal = len(set(self.weights)) == 1

    def part_index(self, digest: Digest) -> int:
        """The shard of `digest`: the highest score `-weight / ln(h)` (the argmax of h
        itself when all weights are equal, which is the same shard, without the logs).
        splitmix64 is inlined: this runs for every digest of every FindMissingBlobs."""
        base = int(digest.hash[:16], 16)
        best, best_score = 0, -math.inf
        equal = self._equal
        for i, seed in enumerate(self.seeds):
            x = base ^ seed
            x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
            x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
            x ^= x >> 31
            score = x if equal else -self.weights[i] / math.log((x + 1) / (_MASK + 2))
            if score > best_score:
                best, best_score = i, score
        return best


class ShardSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    key: str | None = Field(default=None, description="stable identity; defaults to the storage's name or index")
    weight: float = Field(default=1.0, gt=0)
    storage: str | dict


class ShardedOptions(NodeOptions):
    shards: list[ShardSpec] = Field(default_factory=list)
    #: Comma-separated server URLs (or a YAML list), each a `remote` shard keyed by its URL.
    shards_from: str | list[str] | None = Field(default=None, alias="shards-from")
    #: `remote` options applied to every `shards-from` shard (retries, request-timeout, TLS files...).
    shard_defaults: dict[str, Any] = Field(default_factory=dict, alias="shard-defaults")

    @model_validator(mode="after")
    def _some_shards(self) -> ShardedOptions:
        if not self.shards and not self.urls():
            raise ValueError("a sharded storage needs `shards` or a non-empty `shards-from`")
        if "url" in self.shard_defaults or "kind" in self.shard_defaults:
            raise ValueError("shard-defaults cannot set `kind` or `url`: they come from shards-from")
        return self

    def urls(self) -> list[str]:
        raw = self.shards_from or []
        items = raw.split(",") if isinstance(raw, str) else raw
        return [u.strip() for u in items if u.strip()]


@register("sharded", ShardedOptions)
def _build(options: ShardedOptions, loader: StorageLoader, path: str) -> ShardedStorage:
    shards = []
    for i, spec in enumerate(options.shards):
        key = spec.key or (spec.storage if isinstance(spec.storage, str) else spec.storage.get("url", str(i)))
        shards.append((key, loader.build(spec.storage, f"{path}.shards[{i}]"), spec.weight))
    for i, url in enumerate(options.urls()):
        node = {**options.shard_defaults, "kind": "remote", "url": url}
        shards.append((url, loader.build(node, f"{path}.shards-from[{i}]"), 1.0))
    keys = [key for key, _, _ in shards]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"{path}: shard keys must be unique (placement depends on them); repeated: {duplicates}")
    return ShardedStorage(shards, name=path)
