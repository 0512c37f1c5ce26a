"""`casbah.admin.v1.Admin`: scrub, stats and gc inside the server that holds the store.

Maintenance run by a second process beside a live server changed files behind its
back (issue 13: a scrub removed corrupt files while the server's index still said
"present").  Through this service the server does the work itself, on the storage
objects it serves from, so FindMissingBlobs is truthful the moment a scrub drops a
blob.  `casbah admin scrub|stats|gc --remote URL` are the clients; run on a data
directory a server holds, those commands refuse (casbah/cli/admin.py).

Every call needs the write scope on the instance it names: scrub and gc remove
blobs, and stats reveal the size of what others stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from casbah.errors import Aborted
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.protos.casbah.admin.v1 import admin_pb2, admin_pb2_grpc
from casbah.scrub import scrub
from casbah.server.base import Instance, Instances, rpc
from casbah.storage.base import Storage


def _unwrap(node: Storage) -> Storage:
    """The backend under the metrics wrapper the loader puts around every node."""
    while type(node).__name__ == "MetricsStorage":
        node = node.inner  # type: ignore[attr-defined]
    return node


def storage_nodes(instance: Instance, action_cache: bool = True) -> Iterator[Storage]:
    """Every node of the instance's CAS (and ActionCache) graphs, each once, parents first."""
    seen: set[int] = set()
    roots: list[Storage] = [instance.cas]
    ac_storage = getattr(instance.action_cache, "storage", None)  # a storage-backed ActionCache
    if action_cache and isinstance(ac_storage, Storage):
        roots.append(ac_storage)
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        inner = _unwrap(node)
        if id(inner) in seen:
            continue
        seen.add(id(inner))
        yield node
        stack.extend(reversed(list(node.children())))


async def node_stats(instance: Instance) -> list[admin_pb2.NodeStats]:
    out = []
    for node in storage_nodes(instance):
        values = await node.stats()
        out.append(admin_pb2.NodeStats(node=node.node_label, kind=_unwrap(node).kind,
                                       values={k: int(v) for k, v in values.items()}))
    return out


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, instances: Instances) -> None:
        self.instances = instances
        self._scrubbing = asyncio.Lock()  # one scrub at a time: two would only halve each other's rate

    @rpc
    async def Scrub(self, request, context):
        instance = self.instances.get(request.instance_name, None, context, write=True, what="Scrub",
                                      detail="(dry run)" if request.dry_run else "")
        if not request.dry_run:
            instance.check_writable("Scrub")
        if self._scrubbing.locked():
            raise Aborted("a scrub is already running on this server; try again when it has finished")
        async with self._scrubbing:
            report = await scrub(instance.cas, max(request.rate_bytes_per_second, 0), remove=not request.dry_run)
        return admin_pb2.ScrubResponse(
            storage=instance.cas.describe(), scanned=report.scanned, bytes=report.bytes,
            corrupt=[re_pb2.Digest(hash=d.hash, size_bytes=d.size) for d in report.corrupt],
            removed=report.removed, vanished=report.vanished, seconds=report.seconds,
            unreadable=[admin_pb2.Unreadable(digest=re_pb2.Digest(hash=d.hash, size_bytes=d.size), error=e)
                        for d, e in report.unreadable],
        )

    @rpc
    async def Stats(self, request, context):
        instance = self.instances.get(request.instance_name, None, context, write=True, what="Stats")
        return admin_pb2.StatsResponse(nodes=await node_stats(instance))

    @rpc
    async def Gc(self, request, context):
        instance = self.instances.get(request.instance_name, None, context, write=True, what="Gc",
                                      detail=f"to {request.target_bytes} bytes" if request.target_bytes else "")
        instance.check_writable("Gc")
        return await collect(instance, request.target_bytes)


async def collect(instance: Instance, target_bytes: int = 0) -> admin_pb2.GcResponse:
    """Evict every disk node of the instance to its quota; the CAS ones to `target_bytes` if given."""
    removed = 0
    cas = {id(_unwrap(node)) for node in storage_nodes(instance, action_cache=False)}
    for node in storage_nodes(instance):
        inner = _unwrap(node)
        if target_bytes > 0 and id(inner) in cas and hasattr(inner, "evict_to"):
            removed += await inner.evict_to(target_bytes)  # a target is for the CAS only
        elif hasattr(inner, "gc"):
            removed += await inner.gc()
    return admin_pb2.GcResponse(removed=removed, nodes=await node_stats(instance))
