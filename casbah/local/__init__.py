"""The local CAS cache: a directory of objects and named refs (BuildStream CASCache's role).

Layout (compatible in spirit with BuildStream's CASCache):

    objects/<2 hex>/<sha256>   content (objects.py)
    refs/<name>                 text `HASH/SIZE`; names may contain `/`; mtime = last use (refs.py)
    tmp/                        writes in progress
    lock, refs.lock             flocks: objects vs prune; ref compare-and-swap

`LocalCache` is a thin facade: the parts live in `objects.py` (object store,
locking), `refs.py` (refs with compare-and-swap), `checkout.py`, `diff.py`, `gc.py`
(prune, size, quota) and `fsck.py`.  Safe for several processes at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from casbah.digest import Digest, DigestFunction
from casbah.errors import InvalidArgument
from casbah.local import checkout as _checkout
from casbah.local import diff as _diff
from casbah.local import fsck as _fsck
from casbah.local import gc as _gc
from casbah.local.diff import TreeDiff
from casbah.local.fsck import FsckReport
from casbah.local.gc import PruneReport
from casbah.local.objects import FN, ObjectStore
from casbah.local.refs import ANY, AnyValue, Refs
from casbah.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as re_pb2
from casbah.tree import build_tree

__all__ = ["ANY", "FsckReport", "LocalCache", "PruneReport", "TreeDiff"]


class LocalCache:
    def __init__(self, root: str | os.PathLike, quota: int | None = None) -> None:
        """`quota`: bytes the objects may take; `commit` and `pull` evict least recently
        used refs (and what only they reached) after adding, until the cache fits."""
        self.root = Path(root).expanduser()
        self.quota = quota
        #: What the last automatic quota enforcement removed (None: it had nothing to do).
        self.last_gc: PruneReport | None = None
        self.store = ObjectStore(self.root)
        self.named = Refs(self.root, self.store.tmp)
        self.objects = self.store.objects
        self.refs = self.named.dir
        self.tmp = self.store.tmp

    def adding(self) -> contextlib.AbstractContextManager[None]:
        """Hold while adding objects that no ref names yet (commit, pull), or while reading
        a tree that must not be pruned underneath (checkout)."""
        return self.store.locked(exclusive=False)

    # -- objects -------------------------------------------------------------------

    def object_path(self, digest: Digest) -> Path:
        return Path(self.store.path(digest.hash))

    def has(self, digest: Digest) -> bool:
        return self.store.has(digest)

    def missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return self.store.missing(digests)

    def add_bytes(self, data: bytes) -> Digest:
        return self.store.add_bytes(data)

    def add_verified(self, digest: Digest, data: bytes) -> None:
        self.store.add_verified(digest, data)

    def add_stream(self, digest: Digest, chunks: Iterable[bytes], verify: bool = True) -> None:
        self.store.add_stream(digest, chunks, verify)

    def add_file(self, path: str | os.PathLike, link: bool = False) -> Digest:
        return self.store.add_file(path, link)

    def read_bytes(self, digest: Digest) -> bytes:
        return self.store.read_bytes(digest)

    def directory(self, digest: Digest) -> re_pb2.Directory:
        return self.store.directory(digest)

    def walk(self, root: Digest, missing_ok: bool = False) -> Iterator[tuple[str, re_pb2.Directory]]:
        return self.store.walk(root, missing_ok)

    def tree_digests(self, root: Digest, missing_ok: bool = False) -> set[Digest]:
        return self.store.tree_digests(root, missing_ok)

    # -- commit --------------------------------------------------------------------

    def commit(self, path: str | os.PathLike, ref: str | Iterable[str] | None = None, link: bool = False) -> Digest:
        """Store a directory tree; returns (and optionally names, under each of `ref`) its root digest.

        Unchanged files hash to existing objects, which are not written again, so
        re-committing an unchanged tree writes no object.  Files are stored first; the
        Directory messages are then built by `casbah.tree.build_tree` (the same code the
        server uses, so both agree on every digest), which looks the stored files up
        instead of reading them again.  (One thread: on a 2-core machine, threads only
        added GIL hand-offs; the cost is the file system's inode allocation.)
        """
        path = Path(path)
        if not path.is_dir():
            raise InvalidArgument(f"{path} is not a directory")
        store = self.store
        with self.adding():
            stored = {f: store.add_file(f, link=link) for f in _regular_files(str(path))}

            def hasher(file: Path, function: DigestFunction) -> Digest:
                digest = stored.get(str(file))
                return digest if digest is not None else store.add_file(file, link=link)

            build = build_tree(path, FN, hasher=hasher)
            for digest, data in build.directories.items():
                if digest.size and not store.has(digest):
                    store.write_object(digest, data)
            for name in [ref] if isinstance(ref, str) else (ref or []):
                self.set_ref(name, build.root)
        self.enforce_quota(build.root)  # outside the shared lock: prune takes it exclusively
        return build.root

    # -- refs ----------------------------------------------------------------------

    def set_ref(self, name: str, digest: Digest, expected: Digest | AnyValue | None = ANY) -> None:
        """Name `digest`; with `expected` (None: must be absent) a compare-and-swap
        that raises `Aborted` when the ref holds something else."""
        self.named.set(name, digest, expected)

    def get_ref(self, name: str) -> Digest | None:
        return self.named.get(name)

    def resolve(self, name_or_digest: str, touch: bool = True) -> Digest:
        """A ref name, or a digest given as `HASH/SIZE`."""
        return self.named.resolve(name_or_digest, touch)

    def list_refs(self) -> list[tuple[str, Digest, float]]:
        """(name, digest, last use), most recently used first."""
        return self.named.list()

    def remove_ref(self, name: str) -> None:
        self.named.remove(name)

    # -- trees ---------------------------------------------------------------------

    def checkout(self, root: Digest, dest: str | os.PathLike, link: bool = False,
                 allow_external_symlinks: bool = False, within: str | os.PathLike | None = None,
                 verify: bool = False, path: str = "", copy: bool | None = None) -> int:
        """Write the tree (or its subdirectory `path`) into `dest`: copies by default,
        hard links with `link` (see checkout.py).  `copy=True` is the old spelling of the default."""
        if path:
            root = self.subtree(root, path)  # type: ignore[assignment]  # not missing_ok: never None
        return _checkout.checkout(self.store, root, dest, link and not copy, allow_external_symlinks, within,
                                  verify)

    def subtree(self, root: Digest, path: str, missing_ok: bool = False) -> Digest | None:
        return self.store.subtree(root, path, missing_ok)

    def diff(self, a: Digest | None, b: Digest | None, path: str = "") -> TreeDiff:
        """From tree `a` to tree `b` (their subdirectory `path`, absent on a side = empty)."""
        if path:
            a = None if a is None else self.subtree(a, path, missing_ok=True)
            b = None if b is None else self.subtree(b, path, missing_ok=True)
        return _diff.diff(self.store, a, b)

    # -- maintenance ---------------------------------------------------------------

    def reachable(self) -> set[str]:
        return _gc.reachable(self.store, self.named)

    def prune(self) -> PruneReport:
        return _gc.prune(self.store, self.named)

    def size(self) -> int:
        return _gc.size(self.store)

    def gc(self, quota: int, keep: Iterable[Digest] = ()) -> PruneReport:
        return _gc.gc(self.store, self.named, quota, keep)

    def enforce_quota(self, keep: Digest | None = None) -> PruneReport | None:
        """Run `gc` to the configured quota if the cache is over it (after commit and pull,
        keeping the tree just added even if no ref names it)."""
        self.last_gc = None
        if self.quota is not None and self.size() > self.quota:
            self.last_gc = self.gc(self.quota, [keep] if keep is not None else [])
        return self.last_gc

    def fsck(self, remove: bool = True) -> FsckReport:
        return _fsck.fsck(self.store, self.named, remove)


def _regular_files(top: str) -> list[str]:
    """Every regular file under `top` (symlinks not followed); whatever else is there is
    left for build_tree, which refuses special files by name."""
    out: list[str] = []
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    out.append(entry.path)
    return out
