"""Checking the local cache: every object re-hashed, every ref's tree complete."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from casbah.digest import Digest
from casbah.local.objects import ObjectStore, hash_fileobj
from casbah.local.refs import Refs


@dataclass
class FsckReport:
    corrupt: list[Digest] = field(default_factory=list)
    #: ref name -> digests its tree needs that the cache lacks
    incomplete: dict[str, list[Digest]] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.corrupt and not self.incomplete


def fsck(store: ObjectStore, refs: Refs, remove: bool = True) -> FsckReport:
    """Re-hash every object (corrupt ones are removed and reported), then check that
    every ref's tree is complete."""
    report = FsckReport()
    for path, hash_hex, size in store.all_objects():
        if hash_hex is None:
            continue
        try:
            with open(path, "rb", buffering=0) as f:
                actual = hash_fileobj(f)
        except FileNotFoundError:
            continue
        if actual.hash != hash_hex:
            report.corrupt.append(Digest(hash_hex, size))
            if remove:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
    for name, root, _ in refs.list():
        try:
            absent = sorted(store.missing(store.tree_digests(root, missing_ok=True)))
        except Exception:  # an undecodable Directory is as broken as a missing one
            report.incomplete[name] = [root]
            continue
        if absent:
            report.incomplete[name] = absent
    return report
