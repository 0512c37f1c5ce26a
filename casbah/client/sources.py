"""Source descriptions and their native fetchers (git, tar, zip, file, local).

A source knows three things the asset cache needs:

- its URIs: every mirror after alias expansion (`gnu:make-4.4.tar.gz` with an
  alias `gnu` naming two mirrors gives two URIs);
- its fetch qualifiers: the minimal set that pins the content, which is what a
  fetch sends (git: `resource_type=application/x-git` + `vcs.commit`; archives
  and files: `resource_type` + `checksum.sri`);
- its push qualifiers: the complete set known after a native fetch (adds
  `vcs.branch` when known), which is what a push sends.

Qualifier names are the standard ones of the Remote Asset API's qualifiers.md
(`resource_type`, `checksum.sri`, `vcs.commit`, `vcs.branch`), so any server or
client that follows it understands them; Bazel's downloader finds `file`
sources by `checksum.sri` alone.  Two names are deliberately *not* used:

- `vcs.tag` is not in qualifiers.md (a tag is a movable name for a commit, and
  `vcs.commit` already pins the content);
- `directory` means "a subdirectory of the resource" there, and since a fetch
  matches every asset whose qualifiers include the fetch's, pushing a subtree
  with `directory` would let plain fetches of the same URI receive the subtree.

The one casbah-specific name, `casbah.git-dir=included`, marks checkouts that
keep `.git` (`with-git-dir`); no standard name describes that, and a server
doing origin fetches must reject a name it does not know instead of answering
with a tree that lacks `.git`.  Plain git fetches refuse a tree with `.git`.

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
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from casbah.errors import CasbahError, InvalidArgument, NotFound, Unavailable

KINDS = ("git", "tar", "zip", "file", "local")
#: `resource_type` per kind: IANA media types where one exists, `application/x-git` for git
#: (qualifiers.md).  Every tar variant (gz, xz, bz2, plain) is `application/x-tar`: the
#: checksum pins the exact bytes anyway.  `local` is never cached, so it has none.
RESOURCE_TYPES = {
    "git": "application/x-git",
    "tar": "application/x-tar",
    "zip": "application/zip",
    "file": "application/octet-stream",
}
#: The casbah-specific qualifier marking a git checkout that includes `.git`.
GIT_DIR_QUALIFIER = "casbah.git-dir"
_COMMIT = re.compile(r"[0-9a-f]{40}")  # fullmatch only: `$` also matches before a final newline
_SHA256 = re.compile(r"[0-9a-f]{64}")
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
    name: str = ""
    keep_git_dir: bool = False
    filename: str | None = None  # `file`: name to stage it under (default: the URI's last segment)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidArgument(f"unknown source kind {self.kind!r} (known: {', '.join(KINDS)})")
        if not self.uris:
            raise InvalidArgument(f"source {self.name or self.kind}: at least one URI is required")
        self.ref = self.ref.strip().lower() if self.ref else None
        self.sha256 = self.sha256.strip().lower() if self.sha256 else None
        if self.kind == "git" and not (self.ref and _COMMIT.fullmatch(self.ref)):
            raise InvalidArgument(f"git source {self.uris[0]}: ref must be a full 40-hex commit, not {self.ref!r}")
        if self.kind in ("tar", "zip", "file") and not (self.sha256 and _SHA256.fullmatch(self.sha256)):
            raise InvalidArgument(f"{self.kind} source {self.uris[0]}: sha256 must be 64 hex characters")
        if self.keep_git_dir and self.kind != "git":
            raise InvalidArgument(f"{self.kind} source {self.uris[0]}: with-git-dir is for git sources only")
        if self.filename is not None and (not self.filename or "/" in self.filename or self.filename in (".", "..")):
            raise InvalidArgument(f"file source {self.uris[0]}: {self.filename!r} is not a plain file name")
        self.name = self.name or _basename(self.uris[0].rstrip("/"))

    @property
    def is_blob(self) -> bool:
        return self.kind == "file"

    @property
    def cacheable(self) -> bool:
        """Local directories are not pinned by anything: never served from a cache."""
        return self.kind != "local"

    @property
    def staged_name(self) -> str:
        """`file` sources: the name the file gets in the staged directory."""
        return self.filename or _basename(self.uris[0])

    def fetch_qualifiers(self) -> dict[str, str]:
        if not self.cacheable:
            raise InvalidArgument(f"{self.kind} sources are not cached")
        q = {"resource_type": RESOURCE_TYPES[self.kind]}
        if self.kind == "git":
            q["vcs.commit"] = self.ref or ""
            if self.keep_git_dir:
                q[GIT_DIR_QUALIFIER] = "included"
        else:
            q["checksum.sri"] = sri_sha256(self.sha256 or "")
        return q

    def push_qualifiers(self) -> dict[str, str]:
        q = self.fetch_qualifiers()
        if self.kind == "git" and self.branch:
            q["vcs.branch"] = self.branch
        return q


def sri_sha256(hex_digest: str) -> str:
    """`checksum.sri` of a sha256 given in hex: `sha256-<base64 of the raw digest>`."""
    return "sha256-" + base64.b64encode(bytes.fromhex(hex_digest)).decode()


def expand_aliases(url: str, aliases: dict[str, list[str]]) -> list[str]:
    """`alias:path` → every mirror of the alias + path; other URLs stay as they are."""
    alias, sep, rest = url.partition(":")
    if sep and alias in aliases and not rest.startswith("//"):
        return [prefix + rest for prefix in aliases[alias]]
    return [url]


# -- native fetchers -----------------------------------------------------------------


def fetch_native(source: Source, workdir: Path, timeout: float = 600.0) -> Path:
    """Fetch from the origin into `workdir` (empty); returns the tree directory.

    Every URI is tried in order: a mirror may serve the right content where another
    is down or corrupt.  A `file` source is staged as a one-file directory.
    """
    errors: list[CasbahError] = []
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
                target = staged / source.staged_name
                os.replace(download, target)
                target.chmod(0o644)
                return staged
            tree = workdir / "tree"
            tree.mkdir()
            (_extract_tar if source.kind == "tar" else _extract_zip)(download, tree)
            download.unlink()
            return tree
        except CasbahError as exc:
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
    name = PurePosixPath(uri.split("?", 1)[0].split("#", 1)[0]).name
    return name if name not in ("", ".", "..") else "download"


def _download(uri: str, target: Path, timeout: float) -> Path:
    if uri.startswith("file://"):
        try:
            shutil.copyfile(uri.removeprefix("file://"), target)
        except FileNotFoundError:
            raise NotFound(f"{uri}: no such file") from None
        except OSError as exc:
            raise Unavailable(f"{uri}: {exc}") from None
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
    except Exception as exc:  # http.client.IncompleteRead and friends: the origin hung up mid-body
        raise Unavailable(f"{uri}: {type(exc).__name__}: {exc}") from None
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


def _escapes(link: str) -> bool:
    resolved = os.path.normpath(link)
    return os.path.isabs(link) or resolved == ".." or resolved.startswith("../")


def _extract_tar(archive: Path, root: Path) -> None:
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                _safe_member(root, member.name)
                if member.isdev() or member.isfifo():
                    raise SourceError(f"archive member {member.name!r} is a device or FIFO")
                if member.issym() and _escapes(str(PurePosixPath(member.name).parent / member.linkname)):
                    raise SourceError(f"archive link {member.name!r} -> {member.linkname!r} leaves the tree")
                if member.islnk() and _escapes(member.linkname):
                    raise SourceError(f"archive hard link {member.name!r} -> {member.linkname!r} leaves the tree")
                # The data filter (Python >= 3.11.4) enforces the same rules again, on the
                # real paths (a chain of in-tree symlinks can still point out), and drops
                # ownership and special permission bits.
                tar.extract(member, root, filter="data")
    except tarfile.FilterError as exc:
        raise SourceError(f"{archive.name}: refused: {exc}") from None
    except tarfile.TarError as exc:
        raise SourceError(f"{archive.name}: not a readable tar archive: {exc}") from None
    except OSError as exc:
        raise SourceError(f"{archive.name}: cannot be extracted: {exc}") from None


def _extract_zip(archive: Path, root: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                target = _safe_member(root, info.filename)
                mode = info.external_attr >> 16 if info.create_system == 3 else 0
                kind = stat.S_IFMT(mode)
                if kind == stat.S_IFLNK:
                    raise SourceError(f"zip member {info.filename!r} is a symlink (refused)")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise SourceError(f"zip member {info.filename!r} is a device, FIFO or socket")
                if info.is_dir() or kind == stat.S_IFDIR:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, _READ)
                target.chmod(0o755 if mode & 0o111 else 0o644)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive.name}: not a readable zip archive: {exc}") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: encrypted members
        raise SourceError(f"{archive.name}: cannot be extracted: {exc}") from None


def _run_git(*args: str, timeout: float) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_CONFIG_NOSYSTEM": "1"}
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"git {args[0]} timed out") from None
    if done.returncode != 0:
        raise Unavailable(f"git {' '.join(a for a in args if not a.startswith('/'))[:80]}: "
                          f"{done.stderr.strip()[:300]}")
    return done.stdout


def _git(source: Source, uri: str, workdir: Path, timeout: float) -> Path:
    if uri.startswith("-"):
        raise InvalidArgument(f"{uri!r} is not a repository URI")
    repo = workdir / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    _run_git("init", "-q", str(repo), timeout=timeout)
    commit = source.ref or ""
    try:
        _run_git("-C", str(repo), "fetch", "-q", "--depth", "1", "--", uri, commit, timeout=timeout)
    except Unavailable:
        # Servers that refuse unadvertised commits: fetch every branch and tag instead.
        _run_git("-C", str(repo), "fetch", "-q", "--", uri, "+refs/heads/*:refs/remotes/origin/*",
                 "+refs/tags/*:refs/tags/*", timeout=timeout)
    try:
        resolved = _run_git("-C", str(repo), "rev-parse", "--verify", "-q", f"{commit}^{{commit}}",
                            timeout=timeout).strip()
    except Unavailable:
        raise NotFound(f"{uri} has no commit {commit}") from None
    if resolved != commit:
        raise SourceError(f"{uri}: {commit} resolved to {resolved}")
    tree = workdir / "tree"
    tree.mkdir()
    # The same command as the server's origin fetch (casbah/assets/origin.py): line endings
    # as committed and real symlinks whatever the host's git config says, so the same
    # commit gives the same tree digest here and there.
    _run_git("-c", "core.autocrlf=false", "-c", "core.symlinks=true", "--git-dir", str(repo / ".git"),
             "--work-tree", str(tree), "checkout", "-q", "-f", commit, "--", ".", timeout=timeout)
    if source.keep_git_dir:
        _run_git("--git-dir", str(repo / ".git"), "update-ref", "--no-deref", "HEAD", commit, timeout=timeout)
        shutil.move(str(repo / ".git"), str(tree / ".git"))
    shutil.rmtree(repo, ignore_errors=True)
    return tree
