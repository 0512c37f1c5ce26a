"""Source descriptions and their native fetchers (git, tar, zip, file, local).

A source knows three things the asset cache needs:

- its URIs: every mirror after alias expansion (`gnu:make-4.4.tar.gz` with an
  alias `gnu` naming two mirrors gives two URIs);
- its fetch qualifiers: the minimal set that pins the content (git:
  `vcs.commit` + `resource_type=application/x-git`; archives and files:
  `checksum.sri` + `resource_type`), which is what a fetch sends;
- its push qualifiers: the complete set known after a native fetch (adds
  `vcs.branch` / `vcs.tag` when known), which is what a push sends.

Qualifier names are the standard ones of the Remote Asset API's qualifiers.md,
so any server or client that follows it (BuildStream's source cache, Bazel's
downloader with `checksum.sri`) understands them.

Native fetches produce a directory in a scratch area (or one file, for `file`)
and never trust the origin: archives are extracted safely (no absolute paths,
no `..`, no links out of the tree, no device files) and checksums are verified
before anything is kept.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from casbah.errors import CasbahError, InvalidArgument, NotFound, Unavailable

KINDS = ("git", "tar", "zip", "file", "local")
RESOURCE_TYPES = {
    "git": "application/x-git",
    "tar": "application/x-tar",
    "zip": "application/zip",
    "file": "application/octet-stream",
    "local": "application/x-directory",
}
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_READ = 1024 * 1024


class SourceError(CasbahError):
    """A native fetch failed (every URI tried) or its content is not what was pinned."""


@dataclass
class Source:
    kind: str
    uris: list[str]
    ref: str | None = None  # git commit
    sha256: str | None = None  # archives and files
    branch: str | None = None
    tag: str | None = None
    name: str = ""
    keep_git_dir: bool = False
    filename: str | None = None  # `file`: name to stage it under
    extra: dict[str, str] = field(default_factory=dict)  # push qualifiers learnt by the native fetch

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown source kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not self.uris:
            raise InvalidArgument(f"source {self.name or self.kind}: at least one URI is required")
        if self.kind == "git" and not (self.ref and _COMMIT.match(self.ref)):
            raise InvalidArgument(f"git source {self.uris[0]}: --ref must be a full 40-hex commit")
        if self.kind in ("tar", "zip", "file") and not (self.sha256 and re.fullmatch(r"[0-9a-f]{64}", self.sha256)):
            raise InvalidArgument(f"{self.kind} source {self.uris[0]}: --sha256 must be 64 hex characters")
        self.name = self.name or self.uris[0].rstrip("/").rsplit("/", 1)[-1]

    @property
    def is_blob(self) -> bool:
        return self.kind == "file"

    @property
    def cacheable(self) -> bool:
        """Local directories are not pinned by anything: never served from a cache."""
        return self.kind != "local"

    def fetch_qualifiers(self) -> dict[str, str]:
        q = {"resource_type": RESOURCE_TYPES[self.kind]}
        if self.kind == "git":
            q["vcs.commit"] = self.ref or ""
            if self.keep_git_dir:
                q["directory"] = ".git-included"
        elif self.sha256:
            q["checksum.sri"] = "sha256-" + base64.b64encode(bytes.fromhex(self.sha256)).decode()
        return q

    def push_qualifiers(self) -> dict[str, str]:
        q = self.fetch_qualifiers()
        if self.branch:
            q["vcs.branch"] = self.branch
        if self.tag:
            q["vcs.tag"] = self.tag
        q.update(self.extra)
        return q


def expand_aliases(url: str, aliases: dict[str, list[str]]) -> list[str]:
    """`alias:path` → every mirror of the alias + path; other URLs stay as they are."""
    alias, sep, rest = url.partition(":")
    if sep and alias in aliases and not rest.startswith("//"):
        return [prefix + rest for prefix in aliases[alias]]
    return [url]


# -- native fetchers -----------------------------------------------------------------


def fetch_native(source: Source, workdir: Path, timeout: float = 600.0) -> Path:
    """Fetch from the origin into `workdir`; returns the tree directory (or the file)."""
    errors = []
    for uri in source.uris:
        try:
            if source.kind == "git":
                return _git(source, uri, workdir, timeout)
            if source.kind == "local":
                path = Path(uri.removeprefix("file://"))
                if not path.is_dir():
                    raise NotFound(f"{path} is not a directory")
                return path
            download = _download(uri, workdir / "download", timeout)
            actual = _sha256(download)
            if actual != source.sha256:
                raise SourceError(f"{uri}: sha256 is {actual}, expected {source.sha256}")
            if source.kind == "file":
                staged = workdir / "file"
                staged.mkdir()
                target = staged / (source.filename or _basename(uri))
                os.replace(download, target)
                return staged
            tree = workdir / "tree"
            tree.mkdir()
            (_extract_tar if source.kind == "tar" else _extract_zip)(download, tree)
            download.unlink()
            return tree
        except CasbahError as exc:
            # A mirror may serve the right content where another is corrupt: try them all.
            errors.append(exc)
            _clean(workdir)
    detail = "; ".join(str(e) for e in errors)
    if any(isinstance(e, SourceError) for e in errors):
        raise SourceError(f"native fetch of {source.name} rejected: {detail}")
    raise Unavailable(f"native fetch of {source.name} failed from every URI: {detail}")


def _clean(workdir: Path) -> None:
    for child in workdir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _basename(uri: str) -> str:
    name = PurePosixPath(uri.split("?", 1)[0]).name
    return name or "download"


def _download(uri: str, target: Path, timeout: float) -> Path:
    if uri.startswith("file://"):
        shutil.copyfile(uri.removeprefix("file://"), target)
        return target
    if not uri.startswith(("http://", "https://")):
        raise InvalidArgument(f"{uri}: only http(s) and file URLs can be downloaded")
    try:
        with urllib.request.urlopen(uri, timeout=timeout) as response, open(target, "wb") as out:
            while chunk := response.read(_READ):
                out.write(chunk)
    except urllib.error.HTTPError as exc:
        raise (NotFound if exc.code == 404 else Unavailable)(f"{uri}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Unavailable(f"{uri}: {getattr(exc, 'reason', exc)}") from None
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


def _safe_member(root: Path, name: str) -> Path:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise SourceError(f"archive member {name!r} escapes the extraction directory")
    return root.joinpath(*path.parts)


def _extract_tar(archive: Path, root: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                _safe_member(root, member.name)
                if member.isdev() or member.isfifo():
                    raise SourceError(f"archive member {member.name!r} is a device or FIFO")
                if member.issym() or member.islnk():
                    link = PurePosixPath(member.linkname)
                    base = PurePosixPath(member.name).parent if member.issym() else PurePosixPath()
                    resolved = os.path.normpath(str(base / link))
                    if link.is_absolute() or resolved.startswith(".."):
                        raise SourceError(f"archive link {member.name!r} -> {member.linkname!r} leaves the tree")
                # The data filter (Python >= 3.11.4) enforces the same rules again and
                # drops ownership and special permission bits.
                tar.extract(member, root, filter="data")
    except tarfile.TarError as exc:
        raise SourceError(f"{archive.name}: not a readable tar archive: {exc}") from None


def _extract_zip(archive: Path, root: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_member(root, info.filename)
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise SourceError(f"zip member {info.filename!r} is a symlink (refused)")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _READ)
                if mode & 0o111:
                    target.chmod(0o755)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive.name}: not a readable zip archive: {exc}") from None


def _run_git(*args: str, timeout: float) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"git {args[0]} timed out") from None
    if done.returncode != 0:
        raise Unavailable(f"git {' '.join(args[:2])}: {done.stderr.strip()[:300]}")
    return done.stdout


def _git(source: Source, uri: str, workdir: Path, timeout: float) -> Path:
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    _run_git("init", "-q", str(repo), timeout=timeout)
    commit = source.ref or ""
    try:
        _run_git("-C", str(repo), "fetch", "-q", "--depth", "1", uri, commit, timeout=timeout)
    except Unavailable:
        _run_git("-C", str(repo), "fetch", "-q", uri, "+refs/heads/*:refs/remotes/origin/*",
                 "+refs/tags/*:refs/tags/*", timeout=timeout)
    try:
        resolved = _run_git("-C", str(repo), "rev-parse", "--verify", f"{commit}^{{commit}}", timeout=timeout).strip()
    except Unavailable:
        raise NotFound(f"{uri} has no commit {commit}") from None
    if resolved != commit:
        raise SourceError(f"{uri}: {commit} resolved to {resolved}")
    if source.tag is None:
        tags = _run_git("-C", str(repo), "tag", "--points-at", commit, timeout=timeout).split()
        if tags:
            source.extra["vcs.tag"] = sorted(tags)[0]
    tree = workdir / "tree"
    tree.mkdir()
    _run_git("--git-dir", str(repo / ".git"), "--work-tree", str(tree), "checkout", "-q", "-f", commit, "--", ".",
             timeout=timeout)
    if source.keep_git_dir:
        shutil.move(str(repo / ".git"), str(tree / ".git"))
    shutil.rmtree(repo, ignore_errors=True)
    return tree
