"""Writing a tree of the local cache to disk, through the shared tree materialiser.

The whole tree is checked first (names, symlinks: `casbah.client.materialise`), and
every object it needs must be present, so a bad or incomplete tree fails before
anything is written; the tree is then written beneath `dest` without following any
link there.  Files are hard-linked from the cache (executables link the `.x` twin,
since a mode is per inode); where a link is impossible, or with `copy=True`, copied
with ordinary 0644/0755 modes.
"""

from __future__ import annotations

import os
from pathlib import Path

from casbah.client.materialise import Materialiser, plan_tree
from casbah.digest import Digest
from casbah.errors import BlobNotFound, InvalidArgument
from casbah.local.objects import ObjectStore


def checkout(store: ObjectStore, root: Digest, dest: str | os.PathLike, copy: bool = False,
             allow_external_symlinks: bool = False, within: str | os.PathLike | None = None) -> int:
    """Materialize the tree `root` into `dest` (created; must be empty if it exists);
    returns the number of files written."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InvalidArgument(f"checkout target {dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()):
        raise InvalidArgument(f"checkout target {dest} is not empty")
    with store.locked(exclusive=False):
        plan = plan_tree(root, store.directory, allow_external_symlinks)
        absent = {d for _, _, d, _ in plan.files if d.size and not os.path.exists(store.path(d.hash))}
        if absent:
            example = min(absent)
            raise BlobNotFound(example, f"not in local cache {store.root} ({len(absent)} objects of the tree "
                                        "are missing; pull it again)")
        if not copy:
            for digest in {d for _, _, d, x in plan.files if x and d.size}:
                store.executable_twin(digest)
        with Materialiser(plan, dest, within=within) as out:
            _place_all(store, out, copy)
    return len(plan.files)


def _place_all(store: ObjectStore, out: Materialiser, copy: bool) -> None:
    for index, name, digest, executable in out.plan.files:
        if digest.size == 0:  # no object to link: a new file, read-only like the linked ones unless copying
            os.close(out.new_file(index, name, (0o755 if executable else 0o644) & (0o777 if copy else 0o555)))
            continue
        source = store.path(digest.hash)
        if not copy and out.link(source + ".x" if executable else source, index, name):
            continue
        out.copy(source, index, name, 0o755 if executable else 0o644)
