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
import http.client
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

from casbah.digest import Digest, DigestFunction
from casbah.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from casbah.storage.base import CHUNK_SIZE, Storage
from casbah.tree import TreeBuild, build_tree

log = logging.getLogger(__name__)

SRI_ALGORITHMS = {"sha256": hashlib.sha256, "sha384": hashlib.sha384, "sha512": hashlib.sha512}
_COMMIT = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
DEFAULT_TIMEOUT = 600.0


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
            raise InvalidArgument(f"checksum.sri {value!r}: invalid base64") from None
        if best is None or list(SRI_ALGORITHMS).index(algo) > list(SRI_ALGORITHMS).index(best[0]):
            best = (algo, expected)
    if best is None:
        raise InvalidArgument(f"checksum.sri {value!r}: no sha256/sha384/sha512 hash")
    return best


async def file_chunks(path: str | os.PathLike) -> AsyncIterator[bytes]:
    f = await asyncio.to_thread(open, path, "rb", buffering=0)
    try:
        while chunk := await asyncio.to_thread(f.read, CHUNK_SIZE):
            yield chunk
    finally:
        f.close()


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
    def __init__(self, allow: list[str], tmp_dir: str | os.PathLike, git: str = "git") -> None:
        self.allow = [re.compile(pattern) for pattern in allow]
        self.tmp_dir = Path(tmp_dir)
        self.git = git

    def allowed(self, uri: str) -> bool:
        return any(p.match(uri) for p in self.allow)

    def _spool(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="origin-", dir=self.tmp_dir))

    # -- http(s) -> blob ------------------------------------------------------------

    async def fetch_blob(self, cas: Storage, uri: str, sri: str | None, function: DigestFunction,
                         time_limit: float | None) -> Digest:
        if not uri.startswith(("http://", "https://")):
            raise InvalidArgument(f"origin fetch of blobs supports http(s) URIs, not {uri!r}")
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
            try:
                async with asyncio.timeout(limit):
                    digest, actual = await asyncio.to_thread(
                        self._download, uri, path, function, expected, deadline, stop
                    )
            except TimeoutError:
                raise DeadlineExceeded(f"{uri}: origin fetch exceeded its timeout of {limit:g}s") from None
            if expected is not None and actual != expected[1]:
                raise ChecksumMismatch(
                    f"{uri}: content does not match checksum.sri ({expected[0]}-"
                    f"{base64.b64encode(actual).decode()} was served)"
                )
            await cas.write(digest, file_chunks(path))
            log.info("origin fetch: %s -> blob %s", uri, digest)
            return digest
        finally:
            stop.set()
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    def _download(self, uri: str, path: Path, function: DigestFunction, expected: tuple[str, bytes] | None,
                  deadline: float, stop: threading.Event) -> tuple[Digest, bytes | None]:
        hasher = function.hasher()
        sri_hasher = SRI_ALGORITHMS[expected[0]]() if expected else None
        size = 0
        remaining = max(0.1, deadline - time.monotonic())
        try:
            with urllib.request.urlopen(uri, timeout=remaining) as response, open(path, "wb") as out:
                # read1: whatever has arrived, so a slow trickle still reaches the deadline check.
                while chunk := response.read1(CHUNK_SIZE):
                    if stop.is_set() or time.monotonic() > deadline:
                        raise DeadlineExceeded(f"{uri}: origin fetch exceeded its timeout")
                    hasher.update(chunk)
                    if sri_hasher is not None:
                        sri_hasher.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise NotFound(f"{uri}: origin answered 404") from None
            raise Unavailable(f"{uri}: origin answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            if isinstance(exc, TimeoutError) or "timed out" in str(exc):
                raise DeadlineExceeded(f"{uri}: origin fetch timed out") from None
            raise Unavailable(f"{uri}: {exc}") from None
        except http.client.HTTPException as exc:  # e.g. IncompleteRead: the origin hung up mid-body
            raise Unavailable(f"{uri}: {type(exc).__name__}: {exc}") from None
        return Digest(hasher.hexdigest(), size, function), sri_hasher.digest() if sri_hasher else None

    # -- git -> directory -----------------------------------------------------------

    async def fetch_git(self, cas: Storage, uri: str, commit: str, function: DigestFunction,
                        time_limit: float | None) -> Digest:
        if not _COMMIT.match(commit):
            raise InvalidArgument(f"vcs.commit {commit!r} is not a full commit hash")
        if uri.startswith("-"):
            raise InvalidArgument(f"{uri!r} is not a repository URI")
        workdir = self._spool()
        try:
            async with asyncio.timeout(time_limit or DEFAULT_TIMEOUT):
                repo, tree = workdir / "repo", workdir / "tree"
                tree.mkdir()
                await self._git("init", "-q", str(repo))
                try:
                    await self._git("-C", str(repo), "fetch", "-q", "--depth", "1", "--", uri, commit)
                except Unavailable:
                    # Servers that refuse unadvertised commits: fetch everything instead.
                    await self._git("-C", str(repo), "fetch", "-q", "--", uri, "+refs/*:refs/remotes/origin/*")
                try:
                    resolved = (await self._git("-C", str(repo), "rev-parse", "--verify", "-q",
                                                f"{commit}^{{commit}}")).strip()
                except Unavailable:
                    raise NotFound(f"{uri}: commit {commit} is not in the repository") from None
                if resolved != commit:
                    raise FailedPrecondition(f"{uri}: commit {commit} resolved to {resolved}")
                # Line endings as committed, whatever the host's git config says: the same
                # commit must give the same tree on every server.
                await self._git("-c", "core.autocrlf=false", "-c", "core.symlinks=true",
                                "--git-dir", str(repo / ".git"), "--work-tree", str(tree), "checkout", "-q", "-f",
                                commit, "--", ".")
                build = await asyncio.to_thread(build_tree, tree, function)
                await upload_tree(cas, build)
        except TimeoutError:
            raise DeadlineExceeded(f"{uri}: git fetch of {commit} exceeded its timeout") from None
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        log.info("origin fetch: %s@%s -> directory %s (%d files)", uri, commit, build.root, build.file_count)
        return build.root

    async def _git(self, *args: str) -> str:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
        proc = await asyncio.create_subprocess_exec(
            self.git, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        try:
            out, err = await proc.communicate()
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise Unavailable(f"git {' '.join(args[:3])}…: {err.decode(errors='replace').strip()[:500]}")
        return out.decode()
