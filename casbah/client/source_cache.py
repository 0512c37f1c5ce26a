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

Remotes are asked in order and the first hit wins; a source is an error without
native fetching only when every remote that is asked says `only`.  `local`
sources are never cached.

A hit pulls only what the local cache lacks, then stages the tree into the
target.  What a hit can be checked against is checked (a `file` blob against its
sha256; a plain git tree must not hold `.git`); an archive's tree cannot be
re-derived without the archive, so it is trusted to the server that matched its
`checksum.sri`.  Every hit's tree must also be safe to write (names, symlinks:
`casbah.client.materialise`); one that is not counts as an error of that remote.
Nothing is pushed that was not verified: a push follows only a
native fetch that passed its checksum or commit check.

Every step is logged with its URI and outcome and counted in a summary
(hit, miss, error, fallback, native, pushed, failed).
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from casbah.client.materialise import plan_tree
from casbah.client.remote import RemoteClient
from casbah.client.sources import Source, SourceError, fetch_native
from casbah.client.sync import pull, push
from casbah.digest import Digest
from casbah.errors import AssetNotFound, BlobNotFound, CasbahError, InvalidArgument, NotFound, Unavailable
from casbah.local import LocalCache

log = logging.getLogger(__name__)

FETCH_POLICIES = ("off", "fallback", "only")
PUSH_POLICIES = ("on", "off")


@dataclass
class RemotePolicy:
    client: RemoteClient
    fetch: str = "fallback"
    push: str = "off"
    #: Set when the remote stayed UNAVAILABLE through the client's retries: the rest of the
    #: run skips it, so a thousand-source fetch-all does not wait out the retries a
    #: thousand times when the cache is down.
    unreachable: str | None = None

    def __post_init__(self) -> None:
        if self.fetch not in FETCH_POLICIES:
            raise InvalidArgument(f"asset-fetch must be one of {FETCH_POLICIES}, not {self.fetch!r}")
        if self.push not in PUSH_POLICIES:
            raise InvalidArgument(f"asset-push must be one of {PUSH_POLICIES}, not {self.push!r}")

    def failed(self, exc: CasbahError) -> None:
        if isinstance(exc, Unavailable) and self.unreachable is None:
            self.unreachable = str(exc)
            log.warning("%s is unreachable; skipping it for the rest of this run", self.client.spec.url)


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
    """Fetches sources by policy, through a local cache, from any number of remotes."""

    def __init__(self, cache: LocalCache, remotes: list[RemotePolicy], summary: FetchSummary | None = None,
                 allow_external_symlinks: bool = False) -> None:
        self.cache = cache
        self.remotes = remotes
        self.summary = summary or FetchSummary()
        #: Stage symlinks that point outside the staged tree (refused by default).
        self.allow_external_symlinks = allow_external_symlinks

    def fetch(self, source: Source, dest: str | Path, within: str | Path | None = None) -> Digest:
        """Stage `source` into `dest` (created, must be empty); returns its tree digest.
        `within`: a directory of the user's that `dest` lies in; links below it are not followed."""
        dest = Path(dest)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            # Checked first: a fetch that cannot be staged should not cost a download.
            raise InvalidArgument(f"{dest} exists and is not an empty directory")
        root = self._from_assets(source) if source.cacheable else None
        if root is None:
            root = self._native(source)
        self.cache.checkout(root, dest, copy=True, allow_external_symlinks=self.allow_external_symlinks,
                            within=within)
        return root

    def _from_assets(self, source: Source) -> Digest | None:
        askers = [r for r in self.remotes if r.fetch != "off"]
        if not askers:
            return None
        qualifiers = source.fetch_qualifiers()
        problems: list[str] = []
        for remote in askers:
            url = remote.client.spec.url
            if remote.unreachable is not None:
                problems.append(f"{url}: unreachable ({remote.unreachable})")
                self.summary.count("error")
                continue
            try:
                if source.is_blob:
                    blob = remote.client.fetch_blob(source.uris, qualifiers)
                    root = self._blob_tree(remote.client, source, blob)
                else:
                    root = remote.client.fetch_directory(source.uris, qualifiers)
                    if not self._complete_locally(root):
                        pull(self.cache, remote.client, str(root))
                    self._check_tree(source, root)
                    # A poisoned entry (bad names, links out of the tree) is an error of this
                    # remote: the next remote or a native fetch may still serve the source.
                    plan_tree(root, self.cache.directory, self.allow_external_symlinks)
            except AssetNotFound:
                log.info("source %s: miss on %s", source.uris[0], url)
                problems.append(f"{url}: miss")
                self.summary.count("miss")
                continue
            except CasbahError as exc:
                log.warning("source %s: asset fetch from %s failed: %s", source.uris[0], url, exc)
                remote.failed(exc)
                problems.append(f"{url}: {exc}")
                self.summary.count("error")
                continue
            log.info("source %s: hit on %s -> %s", source.uris[0], url, root)
            self.summary.count("hit")
            return root
        if all(r.fetch == "only" for r in askers):
            self.summary.count("failed")
            raise NotFound(
                f"source {source.name} ({source.uris[0]}) is not in the asset cache and native fetching is off "
                f"(asset-fetch: only): {'; '.join(problems)}"
            )
        self.summary.count("fallback")
        return None

    def _complete_locally(self, root: Digest) -> bool:
        """The whole tree is already in the local cache: a hit then costs one RPC, no GetTree."""
        try:
            return not self.cache.missing(sorted(self.cache.tree_digests(root)))
        except BlobNotFound:
            return False

    def _check_tree(self, source: Source, root: Digest) -> None:
        """A git tree with `.git` answers only `with-git-dir` fetches.

        A fetch matches every asset whose qualifiers include the fetch's, so a plain
        fetch also matches a `with-git-dir` push of the same commit (which adds a
        qualifier); git never tracks `.git`, so a root holding one is that variant.
        """
        if source.kind == "git" and not source.keep_git_dir:
            if any(node.name == ".git" for node in self.cache.directory(root).directories):
                raise NotFound(f"{root} is a checkout with .git (pushed by a with-git-dir fetch)")

    def _blob_tree(self, client: RemoteClient, source: Source, blob: Digest) -> Digest:
        """A `file` source is a blob remotely and a one-file directory when staged."""
        if blob.hash != source.sha256:
            # The server matched checksum.sri; a SHA-256 blob digest must then be that sha256.
            raise SourceError(f"asset blob {blob} does not have the pinned sha256 {source.sha256}")
        with tempfile.TemporaryDirectory(prefix="casbah-src-") as tmp:
            staged = Path(tmp) / source.staged_name
            with open(staged, "wb") as f:
                for chunk in client.read_stream(blob):
                    f.write(chunk)
            staged.chmod(0o644)
            return self.cache.commit(tmp)

    def _native(self, source: Source) -> Digest:
        with tempfile.TemporaryDirectory(prefix="casbah-src-") as tmp:
            try:
                tree = fetch_native(source, Path(tmp))
                # Scratch files are nobody's: link them into the cache instead of copying
                # (a `local` tree is the user's own and is copied).
                root = self.cache.commit(tree, link=source.kind != "local")
            except CasbahError:
                self.summary.count("failed")
                raise
            log.info("source %s: fetched natively -> %s", source.uris[0], root)
            self.summary.count("native")
            self._push(source, root, tree)
        return root

    def _push(self, source: Source, root: Digest, tree: Path) -> None:
        for remote in self.remotes:
            if remote.push != "on" or not source.cacheable:
                continue
            if remote.unreachable is not None:
                self.summary.count("error")
                continue
            try:
                client = remote.client
                if source.is_blob:
                    blob = self.cache.add_file(tree / source.staged_name)
                    if client.find_missing([blob]):
                        client.upload({blob: self.cache.object_path(blob)})
                    client.push_blob(source.uris, blob, source.push_qualifiers())
                else:
                    push(self.cache, client, str(root), publish="none")
                    client.push_directory(source.uris, root, source.push_qualifiers())
            except CasbahError as exc:
                log.warning("source %s: push to %s failed: %s", source.uris[0], remote.client.spec.url, exc)
                remote.failed(exc)
                self.summary.count("error")
                continue
            log.info("source %s: pushed to %s", source.uris[0], remote.client.spec.url)
            self.summary.count("pushed")
