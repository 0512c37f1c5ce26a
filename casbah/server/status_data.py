"""What a server reports about its storage and instances: the storage-graph walk,
node stats, and the `/api/status` document.

Shared by the storage gauges of `/metrics` (`casbah.server.collectors`) and the
status page (`casbah.server.status_page`); reads only public state: the
instances, `Storage.children()`/`stats()`/`node_label`, and `Observability`'s windows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

from casbah.server.observability import CACHES, Observability
from casbah.storage.base import Storage
from casbah.storage.spliced import SplicedStorage

log = logging.getLogger("casbah.observability")

#: Seconds one storage node's stats() may take before a report shows it without them.
STATS_TIMEOUT = 5.0


def action_cache_storage(instance: Any) -> Storage | None:
    """The storage node behind an instance's ActionCache, when it is one (not a
    remote, Redis or PostgreSQL ActionCache)."""
    storage = getattr(instance.action_cache, "storage", None)
    return storage if isinstance(storage, Storage) else None


def storage_nodes(instances: Iterable[Any]) -> list[Storage]:
    """Every storage node of every instance (CAS and ActionCache), each once."""
    seen: dict[int, Storage] = {}

    def visit(node: Storage) -> None:
        if id(node) in seen:
            return
        if isinstance(node, SplicedStorage):  # a layer, not a node: its CAS node and its split index are
            visit(node.inner)
            visit(node.index)
            return
        seen[id(node)] = node
        for child in node.children():
            visit(child)

    for inst in instances:
        visit(inst.cas)
        ac_storage = action_cache_storage(inst)
        if ac_storage is not None:
            visit(ac_storage)
    return list(seen.values())


async def node_stats(node: Storage) -> dict[str, int]:
    """A node's stats, or {} when it fails or is too slow (a scrape must still answer)."""
    try:
        return dict(await asyncio.wait_for(node.stats(), STATS_TIMEOUT))
    except Exception as exc:
        log.warning("stats() of storage %s failed: %s", node.node_label, exc)
        return {}


async def all_stats(instances: Iterable[Any]) -> list[tuple[Storage, dict[str, int]]]:
    """Every node with its stats, fetched concurrently."""
    nodes = storage_nodes(instances)
    results = await asyncio.gather(*(node_stats(n) for n in nodes))
    return list(zip(nodes, results, strict=True))


async def status_document(obs: Observability) -> dict[str, Any]:
    """The `/api/status` answer: instances, their storage graphs with stats, hit rates per minute."""
    now = time.time()
    stats = {id(node): found for node, found in await all_stats(obs.instances)}
    instances = []
    for inst in obs.instances:
        ac_storage = action_cache_storage(inst)
        hit_rates = {}
        for cache in CACHES:
            series = obs.hit_window(inst.name, cache).series(now)
            hits = sum(h for _, h, _ in series)
            misses = sum(m for _, _, m in series)
            hit_rates[cache] = {
                "hits": hits, "misses": misses, "rate": hits / (hits + misses) if hits + misses else None,
                "minutes": [{"t": t, "hits": h, "misses": m} for t, h, m in series],
            }
        requests = obs.request_window(inst.name).series(now)
        instances.append({
            "name": inst.name,
            "services": sorted(inst.services),
            "read_only": inst.read_only,
            "describe": inst.cas.describe(),
            "size": _summary(_node(inst.cas), stats),
            "storage": _tree(_node(inst.cas), stats),
            "action_cache": _tree(ac_storage, stats) if ac_storage is not None
            else {"kind": getattr(inst.action_cache, "kind", type(inst.action_cache).__name__), "children": []},
            "hit_rates": hit_rates,
            "requests_last_hour": sum(n for _, n, _ in requests),
            "errors_last_hour": sum(e for _, _, e in requests),
        })
    return {
        "version": obs.version, "started": obs.started, "now": now, "uptime": now - obs.started,
        "listen": obs.listen, "shutting_down": obs.shutting_down, "instances": instances,
    }


def _node(cas: Storage) -> Storage:
    """An instance's configured CAS node, under the chunk-list layer every instance has."""
    return cas.inner if isinstance(cas, SplicedStorage) else cas


def _tree(node: Storage, stats: dict[int, dict[str, int]]) -> dict[str, Any]:
    return {
        "name": node.name, "node": node.node_label, "kind": node.kind, "stats": stats.get(id(node), {}),
        "children": [_tree(child, stats) for child in node.children()],
    }


def _leaves(node: Storage) -> Iterable[Storage]:
    children = list(node.children())
    if not children:
        yield node
    for child in children:
        yield from _leaves(child)


def _summary(root: Storage, stats: dict[int, dict[str, int]]) -> dict[str, int]:
    """Size vs quota of an instance's storage: the root's own stats when it has them
    (disk, memory, the fast tier of a cache), else the sum over its leaves (sharded,
    replicated, size-routed graphs report nothing themselves)."""
    own = stats.get(id(root), {})
    if "bytes" in own:
        return {k: own.get(k, 0) or 0 for k in ("bytes", "objects", "quota_bytes", "evictions")}
    total = {"bytes": 0, "objects": 0, "quota_bytes": 0, "evictions": 0}
    seen: set[int] = set()
    for leaf in _leaves(root):
        if id(leaf) in seen:
            continue
        seen.add(id(leaf))
        for key in total:
            total[key] += stats.get(id(leaf), {}).get(key, 0) or 0
    return total
