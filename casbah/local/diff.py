"""Comparing two trees of the local cache, without checking either out."""

from __future__ import annotations

from dataclasses import dataclass, field

from casbah.digest import Digest
from casbah.local.objects import ObjectStore


@dataclass
class TreeDiff:
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)


def diff(store: ObjectStore, a: Digest | None, b: Digest | None) -> TreeDiff:
    """Paths added, removed and modified from tree `a` to tree `b` (files and symlinks;
    a whole new or removed directory is listed as its files).  Equal subtrees have equal
    digests, so they are skipped without being read.  None is an empty tree."""
    result = TreeDiff()
    _diff(store, a, b, "", result)
    for lst in (result.added, result.removed, result.modified):
        lst.sort()
    return result


def _entries(store: ObjectStore, digest: Digest | None) -> dict[str, tuple[str, object]]:
    if digest is None:
        return {}
    d = store.directory(digest)
    entries: dict[str, tuple[str, object]] = {}
    for f in d.files:
        entries[f.name] = ("file", (f.digest.hash, f.is_executable))
    for s in d.symlinks:
        entries[s.name] = ("symlink", s.target)
    for n in d.directories:
        entries[n.name] = ("dir", Digest(n.digest.hash, n.digest.size_bytes))
    return entries


def _diff(store: ObjectStore, a: Digest | None, b: Digest | None, prefix: str, result: TreeDiff) -> None:
    if a == b:
        return
    left, right = _entries(store, a), _entries(store, b)
    for name in sorted(set(left) | set(right)):
        path = f"{prefix}{name}"
        la, rb = left.get(name), right.get(name)
        if (la is not None and la[0] == "dir") or (rb is not None and rb[0] == "dir"):
            da = la[1] if la is not None and la[0] == "dir" else None
            db = rb[1] if rb is not None and rb[0] == "dir" else None
            if la is not None and la[0] != "dir":
                result.removed.append(path)
            if rb is not None and rb[0] != "dir":
                result.added.append(path)
            _diff(store, da, db, f"{path}/", result)  # type: ignore[arg-type]
        elif la is None:
            result.added.append(path)
        elif rb is None:
            result.removed.append(path)
        elif la != rb:
            result.modified.append(path)
