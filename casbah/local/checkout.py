"""Writing a tree of the local cache to disk, through the shared tree materialiser.

The whole tree is checked first (names, symlinks: `casbah.client.materialise`), and
every object it needs must be present, so a bad or incomplete tree fails before
anything is written; the tree is then written beneath `dest` without following any
link there.

By default files are *copies* (reflinks where the file system shares extents, so a
copy costs no space and almost no time there) with ordinary modes: 0644/0755 minus
the umask.  Editing a checkout then cannot change the cache.  `link=True` hard-links
the objects instead (executables link the `.x` twin, since a mode is per inode):
faster and free on any file system, but the files are the cache's own inodes
(read-only, 444/555), for read-only consumers only: whoever chmods and edits one
corrupts the cache (`fsck` and `checkout --verify` notice).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from casbah.client.materialise import Materialiser, plan_tree
from casbah.digest import Digest
from casbah.errors import BlobNotFound, DataLoss, InvalidArgument
from casbah.local.objects import ObjectStore, hash_fileobj


def umask() -> int:
    """The process umask, read without changing it (os.umask would, racing other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def checkout(store: ObjectStore, root: Digest, dest: str | os.PathLike, link: bool = False,
             allow_external_symlinks: bool = False, within: str | os.PathLike | None = None,
             verify: bool = False) -> int:
    """Materialize the tree `root` into `dest` (created; must be empty if it exists);
    returns the number of files written.  `verify` re-hashes every object first: an
    edited one is removed from the cache and reported as DataLoss, nothing is written."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InvalidArgument(f"checkout target {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise InvalidArgument(f"checkout target {dest} is not empty")
    with store.locked(exclusive=False):
        plan = plan_tree(root, store.directory, allow_external_symlinks)
        needed = {d for _, _, d, _ in plan.files if d.size}
        absent = {d for d in needed if not os.path.exists(store.path(d.hash))}
        if absent:
            example = min(absent)
            raise BlobNotFound(example, f"not in local cache {store.root} ({len(absent)} objects of the tree "
                                        "are missing; pull it again)")
        executables = {d for _, _, d, x in plan.files if x and d.size}
        if link:
            for digest in executables:
                store.executable_twin(digest)
        if verify:
            _verify(store, needed, executables if link else set())
        with Materialiser(plan, dest, within=within) as out:
            _place_all(store, out, link, umask())
    return len(plan.files)


def _verify(store: ObjectStore, needed: set[Digest], twins: set[Digest]) -> None:
    bad = []
    for digest in sorted(needed):
        paths = [store.path(digest.hash)] + ([store.path(digest.hash) + ".x"] if digest in twins else [])
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                actual = hash_fileobj(f)
            if actual.hash != digest.hash or actual.size != digest.size:
                bad.append(digest)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    if bad:
        raise DataLoss(f"{len(bad)} objects of the tree were modified in local cache {store.root} "
                       f"(e.g. {bad[0]}; edited through a --link checkout?); they were removed: pull the tree again")


def _place_all(store: ObjectStore, out: Materialiser, link: bool, mask: int) -> None:
    for index, name, digest, executable in out.plan.files:
        mode = 0o755 if executable else 0o644
        if digest.size == 0:  # no object to link: a new file, read-only like the linked ones when linking
            os.close(out.new_file(index, name, mode & 0o555 if link else mode & ~mask))
            continue
        source = store.path(digest.hash)
        if link and out.link(source + ".x" if executable else source, index, name):
            continue
        out.copy(source, index, name, mode & ~mask)
