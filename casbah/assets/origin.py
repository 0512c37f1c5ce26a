"""Origin fetch: on an asset miss, download the content from where its URI points.

Opt-in per instance, limited to URIs matching an allow-list.  http(s) URIs become
blobs (verified against a `checksum.sri` qualifier when given); a git URI with
`vcs.commit` becomes a directory (the commit's tree, without `.git`).  A download
is spooled to a temporary file while it is hashed, because the digest is only
known at the end, then streamed into storage; nothing is held whole in memory.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from casbah.assets.origin_http import HTTP_SCHEMES, download, make_opener
from casbah.digest import Digest, DigestFunction
from casbah.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    echo,
)
from casbah.storage.base import Storage
from casbah.streams import file_chunks
from casbah.tree import TreeBuild, build_tree

log = logging.getLogger(__name__)

SRI_ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_COMMIT = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")  # SHA-1 or SHA-256 object names; fullmatch only
DEFAULT_TIMEOUT = 600.0
#: Size cap of one fetch when the config sets none and the store's quota is not smaller.
DEFAULT_MAX_SIZE = 4 << 30
#: Git transports origin fetch may use (each only when the allow-list admits the URI).
#: `file` and `ext` are never used: a client must not make the server read its own
#: disk or run a command, whatever the allow-list says.
GIT_SCHEMES = frozenset({"http", "https", "git", "ssh"})


class ChecksumMismatch(NotFound):
    """The origin served content that does not match `checksum.sri`: nothing is indexed,
    and the asset is reported as not found (no content with that checksum exists
    at that URI), with the served checksum in the message."""


def parse_sri(value: str) -> tuple[str, bytes]:
    """The strongest supported hash of an SRI string (`sha256-BASE64 sha512-…`)."""
    best: tuple[str, bytes] | None = None
    for token in value.split():
        algo, _, b64 = token.partition("-")
        if algo not in SRI_ALGORITHMS:
            continue
        try:
            expected = base64.b64decode(b64.split("?")[0], validate=True)
        except ValueError:
            raise InvalidArgument(f"checksum.sri {echo(value)}: invalid base64") from None
        if len(expected) != SRI_ALGORITHMS[algo]().digest_size:
            # No content can match it: a malformed request, not a miss to fetch for.
            raise InvalidArgument(f"checksum.sri {echo(value)}: a {algo} hash is {SRI_ALGORITHMS[algo]().digest_size} "
                                  f"bytes, not {len(expected)}")
        if best is None or list(SRI_ALGORITHMS).index(algo) > list(SRI_ALGORITHMS).index(best[0]):
            best = (algo, expected)
    if best is None:
        raise InvalidArgument(f"checksum.sri {echo(value)}: no sha256/sha384/sha512 hash")
    return best


async def upload_tree(cas: Storage, build: TreeBuild) -> None:
    """Store a built tree: only what `cas` lacks; small files in one batch."""
    everything = [*build.directories, *build.files]
    missing = set(await cas.find_missing(everything))
    small: list[tuple[Digest, bytes]] = [(d, data) for d, data in build.directories.items() if d in missing]
    large: list[tuple[Digest, Path]] = []
    for digest, path in build.files.items():
        if digest not in missing:
            continue
        if digest.size <= 256 * 1024:
            small.append((digest, await asyncio.to_thread(Path(path).read_bytes)))
        else:
            large.append((digest, path))
    for start in range(0, len(small), 512):
        errors = await cas.write_many(small[start : start + 512])
        for error in errors:
            if error is not None:
                raise error
    for digest, path in large:
        await cas.write(digest, file_chunks(path))


class OriginFetcher:
    r"""Downloads for one instance, inside its allow-list, size cap and the request timeout.

    `allow` entries are regular expressions matched at the *start* of a URI (a
    prefix match: anchor the host with a trailing `/` or `:` so that
    `https://example\.com` does not also admit `https://example.com.evil/`).  Every
    redirect hop of an http(s) download must match too; git is never let to follow
    one.
    """

    def __init__(self, allow: list[str], tmp_dir: str | os.PathLike, git: str = "git",
                 max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.allow = [re.compile(pattern) for pattern in allow]
        self.tmp_dir = Path(tmp_dir)
        self.git = git
        self.max_size = max_size
        self._opener = make_opener(self.allowed)

    def allowed(self, uri: str) -> bool:
        return any(p.match(uri) for p in self.allow)

    def _spool(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="origin-", dir=self.tmp_dir))

    # -- http(s) -> blob ------------------------------------------------------------

    async def fetch_blob(self, cas: Storage, uri: str, sri: str | None, function: DigestFunction,
                         time_limit: float | None) -> Digest:
        if urllib.parse.urlsplit(uri).scheme.lower() not in HTTP_SCHEMES:
            raise InvalidArgument(f"origin fetch of blobs supports http(s) URIs, not {echo(uri)}")
        expected = parse_sri(sri) if sri else None
        workdir = self._spool()
        # The download runs in a thread, which cannot be cancelled: on timeout (or when
        # the client goes away) `stop` tells it to quit at its next chunk, and its socket
        # timeout bounds how long a silent origin can keep it.
        stop = threading.Event()
        try:
            limit = time_limit or DEFAULT_TIMEOUT
            deadline = time.monotonic() + limit
            path = workdir / "download"
            sri_hasher = SRI_ALGORITHMS[expected[0]]() if expected else None
            try:
                async with asyncio.timeout(limit):
                    digest = await asyncio.to_thread(
                        download, self._opener, uri, path, function, sri_hasher, self.max_size, deadline, stop
                    )
            except TimeoutError:
                raise DeadlineExceeded(f"{uri}: origin fetch exceeded its timeout of {limit:g}s") from None
            if expected is not None and sri_hasher is not None and sri_hasher.digest() != expected[1]:
                raise ChecksumMismatch(
                    f"{uri}: content does not match checksum.sri ({expected[0]}-"
                    f"{base64.b64encode(sri_hasher.digest()).decode()} was served)"
                )
            await cas.write(digest, file_chunks(path))
            log.info("origin fetch: %s -> blob %s", uri, digest)
            return digest
        finally:
            stop.set()
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    # -- git -> directory -----------------------------------------------------------

    async def fetch_git(self, cas: Storage, uri: str, commit: str, function: DigestFunction,
                        time_limit: float | None) -> Digest:
        if not _COMMIT.fullmatch(commit):
            raise InvalidArgument(f"vcs.commit {echo(commit)} is not a full commit hash")
        scheme = git_scheme(uri)
        if scheme is None:
            raise InvalidArgument(f"{echo(uri)} is not a repository URI origin fetch may use "
                                  f"(git over {', '.join(sorted(GIT_SCHEMES))})")
        git = _Git(self.git, scheme, self.max_size)
        workdir = self._spool()
        try:
            async with asyncio.timeout(time_limit or DEFAULT_TIMEOUT):
                repo, tree = workdir / "repo", workdir / "tree"
                tree.mkdir()
                await git("init", "-q", str(repo))
                try:
                    await git("-C", str(repo), "fetch", "-q", "--depth", "1", "--", uri, commit, watch=repo)
                except Unavailable:
                    # Servers that refuse unadvertised commits: fetch everything instead.
                    await git("-C", str(repo), "fetch", "-q", "--", uri, "+refs/*:refs/remotes/origin/*", watch=repo)
                try:
                    resolved = (await git("-C", str(repo), "rev-parse", "--verify", "-q",
                                          f"{commit}^{{commit}}")).strip()
                except Unavailable:
                    raise NotFound(f"{uri}: commit {commit} is not in the repository") from None
                if resolved != commit:
                    raise FailedPrecondition(f"{uri}: commit {commit} resolved to {resolved}")
                # Line endings as committed, whatever the host's git config says: the same
                # commit must give the same tree on every server.
                await git("-c", "core.autocrlf=false", "-c", "core.symlinks=true",
                          "--git-dir", str(repo / ".git"), "--work-tree", str(tree), "checkout", "-q", "-f",
                          commit, "--", ".", watch=tree)
                build = await asyncio.to_thread(build_tree, tree, function)
                await upload_tree(cas, build)
        except TimeoutError:
            raise DeadlineExceeded(f"{uri}: git fetch of {commit} exceeded its timeout") from None
        except ResourceExhausted as exc:
            raise ResourceExhausted(f"{uri}@{commit}: {exc}") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        log.info("origin fetch: %s@%s -> directory %s (%d files)", uri, commit, build.root, build.file_count)
        return build.root


def git_scheme(uri: str) -> str | None:
    """The git transport a URI names, when origin fetch may use it; else None.

    Only `scheme://` URIs: scp-like `host:path`, local paths and `ext::` (which
    runs a command) are never fetched, and nothing starting with `-` reaches git.
    """
    if uri.startswith("-") or "://" not in uri:
        return None
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    return scheme if scheme in GIT_SCHEMES and uri[: len(scheme) + 3].lower() == f"{scheme}://" else None


class _Git:
    """Runs git for one fetch: only the URI's transport, no redirects, no prompts, a size cap.

    `protocol.allow=never` plus `protocol.<scheme>.allow=always` (and the same in
    GIT_ALLOW_PROTOCOL, which would otherwise override the config when inherited)
    keeps git to the one transport the allow-list admitted; `http.followRedirects=false`
    stops git following an allowed server's redirect to a host the allow-list does
    not name (git's default follows the first request's redirects).
    """

    def __init__(self, git: str, scheme: str, max_size: int) -> None:
        self.git = git
        self.max_size = max_size
        self.config = ["-c", "protocol.allow=never", "-c", f"protocol.{scheme}.allow=always",
                       "-c", "http.followRedirects=false"]
        self.env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1",
                    "GIT_ALLOW_PROTOCOL": scheme}

    async def __call__(self, *args: str, watch: Path | None = None) -> str:
        """git ARGS; with `watch`, killed (RESOURCE_EXHAUSTED) once that directory outgrows the cap."""
        proc = await asyncio.create_subprocess_exec(
            self.git, *self.config, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        watcher = asyncio.create_task(self._watch(proc, watch)) if watch is not None else None
        try:
            out, err = await proc.communicate()
        except BaseException:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if watcher is not None and watch is not None:
            killed = watcher.done() and not watcher.cancelled() and watcher.result()
            # The watcher may not have polled yet (a fast fetch): measure once more at the end.
            if killed or await asyncio.to_thread(_tree_size, watch) > self.max_size:
                what = "checkout" if watch.name == "tree" else "fetch"
                raise ResourceExhausted(f"git {what}: more than the origin-fetch size cap of {self.max_size} bytes")
        if proc.returncode != 0:
            raise Unavailable(f"git {' '.join(args[:3])}…: {err.decode(errors='replace').strip()[:500]}")
        return out.decode()

    async def _watch(self, proc: asyncio.subprocess.Process, path: Path) -> bool:
        """Poll the size of `path`; True (after killing git) when it passes the cap."""
        while proc.returncode is None:
            await asyncio.sleep(0.5)
            if await asyncio.to_thread(_tree_size, path) > self.max_size:
                proc.kill()
                return True
        return False


def _tree_size(path: Path) -> int:
    """Bytes of the regular files under `path` (what a fetch has written so far)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total
