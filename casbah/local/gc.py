"""Reclaiming space in the local cache: prune (unreferenced objects), size, and gc to a quota
(least recently used refs first)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from casbah.digest import Digest
from casbah.errors import NotFound
from casbah.local.objects import ObjectStore
from casbah.local.refs import Refs

#: Temporary files older than this are leftovers of a dead process.
_STALE_TMP = 3600


@dataclass
class PruneReport:
    objects_removed: int = 0
    bytes_removed: int = 0
    refs_removed: list[str] = field(default_factory=list)


def reachable(store: ObjectStore, refs: Refs, keep: Iterable[Digest] = ()) -> set[str]:
    """Hashes of every object some ref's tree (or a tree of `keep`) needs."""
    hashes: set[str] = set()
    for root in [*(r for _, r, _ in refs.list()), *keep]:
        hashes.update(d.hash for d in store.tree_digests(root, missing_ok=True))
    return hashes


def prune(store: ObjectStore, refs: Refs, keep: Iterable[Digest] = ()) -> PruneReport:
    """Delete every object no ref reaches (and stale temporary files).  Holds the cache
    lock exclusively, so no commit or pull is between writing objects and naming them."""
    report = PruneReport()
    with store.locked(exclusive=True):
        needed = reachable(store, refs, keep)
        for path, hash_hex, size in store.all_objects():
            if hash_hex is None or hash_hex not in needed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    report.bytes_removed += size
                    report.objects_removed += 1
        horizon = time.time() - _STALE_TMP
        for entry in os.scandir(store.tmp):
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < horizon:
                    os.unlink(entry.path)
    return report


def size(store: ObjectStore) -> int:
    """Bytes of every object file (executable twins included: they take space too)."""
    return sum(n for _, _, n in store.all_objects())


def gc(store: ObjectStore, refs: Refs, quota: int, keep: Iterable[Digest] = ()) -> PruneReport:
    """Evict least recently used refs, then prune, until the objects fit in `quota`
    (the trees of `keep` stay: the one a commit or pull just made, named or not)."""
    keep = list(keep)
    report = prune(store, refs, keep)
    remaining = refs.list()  # most recent first
    while remaining and size(store) > quota:
        name, _, _ = remaining.pop()
        with contextlib.suppress(NotFound):
            refs.remove(name)
        report.refs_removed.append(name)
        step = prune(store, refs, keep)
        report.objects_removed += step.objects_removed
        report.bytes_removed += step.bytes_removed
    return report
