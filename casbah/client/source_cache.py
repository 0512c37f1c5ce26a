"""Fetching sources through the Remote Asset cache, by policy.

Fetch and push policies are independent, per remote:

| `asset-fetch` | meaning |
|---|---|
| `off`      | never ask the asset cache; fetch natively |
| `fallback` | ask the asset cache (every URI + the fetch qualifiers); on a miss or error, fetch natively |
| `only`     | ask the asset cache; a miss is an error (air-gapped builds) |

| `asset-push` | meaning |
|---|---|
| `on`  | after a native fetch, upload what CAS lacks and push the asset (every URI, the push qualifiers) |
| `off` | never push |

A hit pulls only what the local cache lacks, then stages the tree into the target.
Every step is logged with its URI and outcome and counted in a summary.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from casbah.client.cache import LocalCache
from casbah.client.remote import RemoteClient
from casbah.client.sources import Source, SourceError, fetch_native
from casbah.client.sync import pull, push
from casbah.digest import Digest
from casbah.errors import CasbahError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

FETCH_POLICIES = ("off", "fallback", "only")
PUSH_POLICIES = ("on", "off")


@dataclass
class RemotePolicy:
    client: RemoteClient
    fetch: str = "fallback"
    push: str = "off"

    def __post_init__(self) -> None:
        if self.fetch not in FETCH_POLICIES:
            raise InvalidArgument(f"asset-fetch must be one of {FETCH_POLICIES}, not {self.fetch!r}")
        if self.push not in PUSH_POLICIES:
            raise InvalidArgument(f"asset-push must be one of {PUSH_POLICIES}, not {self.push!r}")


@dataclass
class FetchSummary:
    counts: Counter = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def line(self) -> str:
        order = ("hit", "miss", "error", "fallback", "native", "pushed", "failed")
        return ", ".join(f"{self.counts[k]} {k}" for k in order if self.counts[k]) or "nothing fetched"


class SourceCache:
    def __init__(self, cache: LocalCache, remotes: list[RemotePolicy], summary: FetchSummary | None = None) -> None:
        self.cache = cache
        self.remotes = remotes
        self.summary = summary or FetchSummary()

    def fetch(self, source: Source, dest: str | Path) -> Digest:
        """Stage `source` into `dest` (created, must be empty); returns its tree digest."""
        root = self._from_assets(source) if source.cacheable else None
        if root is None:
            root = self._native(source)
        self.cache.checkout(root, dest, copy=True)
        return root

    def _from_assets(self, source: Source) -> Digest | None:
        askers = [r for r in self.remotes if r.fetch != "off"]
        if not askers:
            return None
        qualifiers = source.fetch_qualifiers()
        for remote in askers:
            url = remote.client.spec.url
            try:
                if source.is_blob:
                    blob = remote.client.fetch_blob(source.uris, qualifiers)
                    root = self._blob_tree(remote.client, source, blob) if blob else None
                else:
                    root = remote.client.fetch_directory(source.uris, qualifiers)
                    if root is not None:
                        pull(self.cache, remote.client, str(root))
            except CasbahError as exc:
                log.warning("source %s: asset fetch from %s failed: %s", source.uris[0], url, exc)
                self.summary.count("error")
                continue
            if root is not None:
                log.info("source %s: hit on %s -> %s", source.uris[0], url, root)
                self.summary.count("hit")
                return root
            log.info("source %s: miss on %s", source.uris[0], url)
            self.summary.count("miss")
        if any(r.fetch == "only" for r in askers) and all(r.fetch != "fallback" for r in askers):
            self.summary.count("failed")
            raise NotFound(
                f"source {source.name} ({source.uris[0]}) is not in the asset cache and native fetching is off "
                f"(asset-fetch: only)"
            )
        self.summary.count("fallback")
        return None

    def _blob_tree(self, client: RemoteClient, source: Source, blob: Digest) -> Digest:
        """A `file` source is a blob remotely and a one-file directory when staged."""
        with tempfile.TemporaryDirectory(prefix="casbah-src-") as tmp:
            staged = Path(tmp) / (source.filename or Path(source.uris[0].split("?")[0]).name or "download")
            with open(staged, "wb") as f:
                for chunk in client.read_stream(blob):
                    f.write(chunk)
            return self.cache.commit(tmp)

    def _native(self, source: Source) -> Digest:
        with tempfile.TemporaryDirectory(prefix="casbah-src-") as tmp:
            try:
                tree = fetch_native(source, Path(tmp))
            except SourceError:
                self.summary.count("failed")
                raise
            root = self.cache.commit(tree)
            log.info("source %s: fetched natively -> %s", source.uris[0], root)
            self.summary.count("native")
            self._push(source, root, tree)
        return root

    def _push(self, source: Source, root: Digest, tree: Path) -> None:
        for remote in self.remotes:
            if remote.push != "on" or not source.cacheable:
                continue
            try:
                client = remote.client
                if source.is_blob:
                    files = [p for p in tree.iterdir() if p.is_file()]
                    blob = self.cache.add_file(files[0])
                    if client.find_missing([blob]):
                        client.upload({blob: self.cache.object_path(blob)})
                    client.push_blob(source.uris, blob, source.push_qualifiers())
                else:
                    push(self.cache, client, str(root), publish="none")
                    client.push_directory(source.uris, root, source.push_qualifiers())
            except CasbahError as exc:
                log.warning("source %s: push to %s failed: %s", source.uris[0], remote.client.spec.url, exc)
                self.summary.count("error")
                continue
            log.info("source %s: pushed to %s", source.uris[0], remote.client.spec.url)
            self.summary.count("pushed")


def stage_fresh(dest: Path) -> None:
    """Refuse to stage over existing content: a half-old tree is worse than an error."""
    if dest.exists() and any(dest.iterdir()):
        raise InvalidArgument(f"{dest} exists and is not empty")
    shutil.rmtree(dest, ignore_errors=True)
